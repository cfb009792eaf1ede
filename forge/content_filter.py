"""Prompt filter: configurable terms, matched after normalising away simple evasions (case, accents,
Unicode look-alikes, leetspeak, letters spaced or dotted apart). Whole words and phrases only, so
"assassin" never matches "ass"."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from forge.errors import ForgeError

# Look-alike letters from other scripts, mapped to the Latin letter they imitate.
CONFUSABLES = str.maketrans(
    {
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
        "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ј": "j", "ԁ": "d", "ɡ": "g", "ո": "n", "ս": "u",
        "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
        "υ": "u", "χ": "x", "ω": "w",
    }
)  # fmt: skip
LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a",
                      "$": "s", "!": "i", "|": "l", "+": "t", "€": "e"})  # fmt: skip
_WORD = re.compile(r"[a-z]+")


DEFAULT_BLOCKED_TERMS = Path(__file__).resolve().parent.parent / "configs" / "content_filter" / "blocked_terms.txt"


CONTENT_FILTERED = "content_filtered"


class ContentFiltered(ForgeError):
    code = CONTENT_FILTERED
    status = 422


def normalise(text: str) -> list[str]:
    """The words of `text` as the filter compares them."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(CONFUSABLES)
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = text.translate(LEET)
    return _WORD.findall(text)


def _squeezed(words: tuple[str, ...]) -> tuple[str, ...]:
    """Repeated letters collapsed ("nuuuude" -> "nude"), for terms long enough not to collide."""
    return tuple(re.sub(r"(.)\1+", r"\1", word) for word in words)


SQUEEZE_MIN_LETTERS = 4  # shorter terms match exactly only: "ass" squeezed would be "as"


class PromptFilter:
    def __init__(self, terms: Iterable[str]) -> None:
        self._phrases = {tuple(words) for term in terms if (words := normalise(term))}
        self._squeezed = {_squeezed(phrase) for phrase in self._phrases if sum(map(len, phrase)) >= SQUEEZE_MIN_LETTERS}
        self._longest = max((len(p) for p in self._phrases), default=0)

    @classmethod
    def from_file(cls, path: Path) -> PromptFilter:
        lines = path.read_text(encoding="utf-8").splitlines()
        return cls(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))

    def __len__(self) -> int:
        return len(self._phrases)

    def _listed(self, phrase: tuple[str, ...]) -> bool:
        return phrase in self._phrases or _squeezed(phrase) in self._squeezed

    def blocked(self, text: str) -> str | None:
        """The first listed term that `text` contains, as normalised words, or None."""
        words = normalise(text)
        for start in range(len(words)):
            for length in range(1, min(self._longest, len(words) - start) + 1):
                phrase = tuple(words[start : start + length])
                if self._listed(phrase):
                    return " ".join(phrase)
            # Letters spaced or dotted apart ("n u d e", "n.u.d.e") read as one word, from any of them.
            run = 0
            while start + run < len(words) and len(words[start + run]) == 1:
                run += 1
                joined = "".join(words[start : start + run])
                if run >= 2 and self._listed((joined,)):
                    return joined
        return None

    def check(self, field: str, text: str) -> None:
        if self.blocked(text) is not None:
            raise ContentFiltered(
                f"the {field.replace('_', ' ')} contains a term this server does not allow", field=field, rule="blocked"
            )
