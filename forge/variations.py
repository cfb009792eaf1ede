"""Prompt variations: `{red|blue|green} knight` and `__name__` wildcards from `<data_dir>/wildcards/name.txt`
(one choice per line; folders give `__folder/name__`), expanded by the `dynamicprompts` package as A1111's and
Fooocus' dynamic prompts do. Random mode picks each image's choices from that image's seed, so one seed always
gives one prompt; combinatorial mode makes the combinations in order (cycled when there are fewer than images).
"""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
from dynamicprompts.wildcards import WildcardManager
from dynamicprompts.wildcards.values import WildcardValues
from pyparsing import ParseBaseException

from forge.errors import InvalidRequest
from forge.requests import VariationMode

# Either syntax: a `{...}` group or a `__name__` wildcard. Prompts without them are left exactly as written.
_SYNTAX = re.compile(r"\{[^{}]*\}|__[^_\s](?:[^\s]*?)__")

# dynamicprompts logs a warning and keeps `__name__` as text for a wildcard it cannot find; ours refuse it.
logging.getLogger("dynamicprompts").setLevel(logging.ERROR)


class MissingWildcard(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _StrictWildcards(WildcardManager):
    def get_values(self, wildcard: str) -> WildcardValues:
        values = super().get_values(wildcard)
        if len(values) == 0:
            raise MissingWildcard(wildcard)
        return values


class PromptVariations:
    """Expands prompts with variation syntax; `folder` holds the wildcard files (None: no wildcards)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._wildcards = _StrictWildcards(folder)

    def wildcards(self) -> list[tuple[str, int]]:
        """(name, number of choices) of each wildcard a prompt may name as `__name__`."""
        if self.folder is None or not self.folder.is_dir():
            return []
        self._wildcards.clear_cache()
        names = sorted(self._wildcards.get_collection_names())
        return [(name, len(self._wildcards.get_values(name))) for name in names]

    @staticmethod
    def varies(prompt: str) -> bool:
        return _SYNTAX.search(prompt) is not None

    def expand(self, prompt: str, mode: VariationMode, seeds: list[int], field: str = "prompt") -> list[str]:
        """One prompt per seed; the prompt itself for each when it has no variations (or mode is off)."""
        if mode == "off" or not self.varies(prompt):
            return [prompt] * len(seeds)
        self._wildcards.clear_cache()  # files added or edited since are read again
        try:
            if mode == "random":
                return list(RandomPromptGenerator(self._wildcards).generate(prompt, len(seeds), seeds=seeds))
            combinations = CombinatorialPromptGenerator(self._wildcards).generate(prompt, max_prompts=len(seeds))
        except MissingWildcard as exc:
            where = f"in {self.folder}" if self.folder is not None else "(no wildcards folder is configured)"
            raise InvalidRequest(
                f"{field} names the wildcard __{exc.name}__, but there is no {exc.name}.txt {where}",
                field=field,
                rule="wildcard",
            ) from exc
        except ParseBaseException as exc:
            raise InvalidRequest(
                f"{field} has a variation that does not parse ({exc.msg} at character {exc.loc}): "
                "write {a|b} for choices and __name__ for a wildcard",
                field=field,
                rule="syntax",
            ) from exc
        if not combinations:
            return [prompt] * len(seeds)
        return list(itertools.islice(itertools.cycle(combinations), len(seeds)))
