"""AUTOMATIC1111's prompt language: emphasis, escapes and BREAK (a port of `parse_prompt_attention` from A1111's
modules/prompt_parser.py, with its regular expression), and the weight limits ingress checks.

Pure Python: ingress parses prompts to validate them without loading a model; the engines' prompt encoder
(engines.prompt_encoder) parses them again to weight the tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from forge.errors import InvalidRequest

# `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:w)` multiplies by w; `\(` `\)` `\[` `\]` `\\` are the
# characters themselves; anything else is text. A1111's expression, token for token.
_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND = 1.1
SQUARE = 1 / 1.1
BREAK = "BREAK"  # a fragment's text when it is a chunk break (its weight is None)

MIN_WEIGHT = 0.0
MAX_WEIGHT = 4.0


@dataclass
class Fragment:
    """A run of prompt text and the weight its tokens get; `weight` None: a BREAK (start a new chunk)."""

    text: str
    weight: float | None

    @property
    def is_break(self) -> bool:
        return self.weight is None


def parse_prompt_attention(text: str) -> list[Fragment]:
    """The prompt as fragments of text with their weights, as A1111 parses it.

    Lenient as A1111 is: an unclosed `(` or `[` applies to the rest of the prompt, and a `)` or `]` that closes
    nothing is text. Runs of equal weight are merged, so `(red hair:1.0), knight` is exactly `red hair, knight`.
    One difference: a BREAK inside brackets still breaks (A1111 multiplies its marker and then reads it as the
    word BREAK with a negative weight).

    >>> [(f.text, round(f.weight, 4)) for f in parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun")]
    [('a ', 1.0), ('house', 1.573), (' ', 1.1), ('on', 1.0), (' a ', 1.1), ('hill', 0.55), (', sun', 1.1)]
    """
    fragments: list[Fragment] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            if fragment.weight is not None:
                fragment.weight *= multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append(Fragment(token[1:], 1.0))
        elif token == "(":
            round_brackets.append(len(fragments))
        elif token == "[":
            square_brackets.append(len(fragments))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _number(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index > 0:
                    fragments.append(Fragment(BREAK, None))
                fragments.append(Fragment(part, 1.0))
    for position in round_brackets:
        multiply_range(position, ROUND)
    for position in square_brackets:
        multiply_range(position, SQUARE)
    if not fragments:
        fragments = [Fragment("", 1.0)]
    merged = [fragments[0]]
    for fragment in fragments[1:]:
        last = merged[-1]
        if fragment.weight is not None and last.weight == fragment.weight:
            last.text += fragment.text
        else:
            merged.append(fragment)
    return merged


def _number(text: str) -> float:
    """A weight as A1111 reads it (`float`); a malformed one (`1.2.3`, `.`) is NaN, which validation refuses."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def has_syntax(text: str) -> bool:
    """Whether the prompt uses any of the language (brackets, escapes, BREAK); without, it is plain text."""
    return any(ch in text for ch in "()[]\\") or "BREAK" in text


def check_weights(text: str, field: str) -> None:
    """Refuse a prompt in which some text gets an emphasis weight outside [0, 4], as a 422 naming `field`.

    The weight checked is the one each token ends up with (nesting multiplies). Why these bounds: A1111's
    ("Original") emphasis multiplies each token's hidden state by its weight and then rescales the whole chunk
    back to the mean it had. A negative weight flips a token's features, and with it the mean the chunk is
    divided by can come near zero, so the rescale blows every token up (noise or a black image, never what was
    meant); far above 4 one token outweighs the rest of the chunk and the image breaks up the same way. 0 (the
    token says nothing) up to 4 covers every weight prompts from model sites use (1.1 to 2 mostly), and it is
    the range LoRA weights have here. A weight that is not a number (`(x:1.2.3)`) is refused too.
    """
    if not has_syntax(text):
        return
    for fragment in parse_prompt_attention(text):
        weight = fragment.weight
        if weight is None or MIN_WEIGHT <= weight <= MAX_WEIGHT:
            continue
        words = fragment.text.strip() or fragment.text
        shown = f"{weight:.3g}" if weight == weight else "not a number"
        raise InvalidRequest(
            f"{field}: the emphasis weight of {words[:40]!r} is {shown}; weights must be from {MIN_WEIGHT:g} to "
            f"{MAX_WEIGHT:g} (nested brackets multiply)",
            field=field,
            rule="range",
        )
