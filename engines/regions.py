"""Regional compilation, kept as files: each repeated block kind (engines.compiled.REGIONS) is compiled ahead of
time with torch's AOT compile, once per block shape, and the result (dynamo's guards and bytecode with
inductor's compiled graph) is written beside the compile cache. A restart loads those files and calls them
directly: nothing is traced again.

Why not `nn.Module.compile` with the compile cache: a restart from a warm cache still traces every block graph
with dynamo before it finds the compiled code on disk, and that tracing was most of a warm start (on a
2-core CPU 0.5 s of each graph's 0.52 s; on an H200 host, 20 s for SDXL's 15 graphs).

A block's call tries the graphs compiled for its class, in order, by their guards (input shapes with the rows
symbolic, dtypes, strides, grad mode, the block's parameters and attributes); the first that holds runs. When
none does, the block is compiled for that call's shapes, and the new graph is kept. Guards on globals (the
modules and builtins the blocks use) are left out, as they cannot be written to a file and do not change.
A block that cannot be captured as one graph is compiled by dynamo as before (with a warning), and so are all
blocks with `ahead_of_time` off (quantised weights: torchao's tensor subclasses are documented with dynamo).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FOLDER = "regions"
# One compile at a time in the process: dynamo's tracing state is global.
_compiling = threading.Lock()


def _serialisable_guards(entries: Sequence[Any]) -> list[bool]:
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = set(getattr(CheckFunctionManager, "UNSUPPORTED_SERIALIZATION_GUARD_TYPES", _UNSERIALISABLE))
    return [
        not (
            entry.is_global
            or entry.guard_type in unsupported
            or unsupported.intersection(getattr(entry, "derived_guard_types", ()))
        )
        for entry in entries
    ]


# The guard types torch cannot write to a file, where it does not list them itself (older releases).
_UNSERIALISABLE = ("DICT_VERSION", "NN_MODULE", "ID_MATCH", "FUNCTION_MATCH", "CLASS_MATCH", "MODULE_MATCH",
                   "CLOSURE_MATCH", "WEAKREF_ALIVE")  # fmt: skip


def ahead_of_time_compiles() -> bool:
    """Whether this torch has AOT compile (a callable compiled with torch.compile, written to a file and loaded
    without tracing)."""
    try:
        from torch._dynamo.aot_compile import AOTCompiledFunction
    except ImportError:
        return False
    return all(hasattr(AOTCompiledFunction, name) for name in ("serialize", "deserialize", "guard_check"))


@dataclass
class _Kind:
    """The graphs compiled for one block class, and dynamo's compile of it for blocks AOT compile cannot take."""

    graphs: list[Any] = field(default_factory=list)  # torch._dynamo.aot_compile.AOTCompiledFunction
    fallback: Callable[..., Any] | None = None


class CompiledRegions:
    """Installs itself as the compiled call of every block of `module` whose class is in `regions`, loading the
    graphs kept in `folder`. `dynamic_rows`: each compile makes the row (batch) dimension of the block's inputs
    symbolic and every other dimension static, so one graph per block shape serves every batch size.
    `on_compile` is called for each graph compiled (not for those loaded)."""

    def __init__(
        self,
        module: torch.nn.Module,
        regions: frozenset[str],
        folder: Path,
        on_compile: Callable[[], None],
        dynamic_rows: bool = False,
        dynamic: bool | None = None,
        options: dict[str, Any] | None = None,
        ahead_of_time: bool = True,
    ) -> None:
        self.folder = folder
        self.loaded = 0
        self._on_compile = on_compile
        self._dynamic_rows = dynamic_rows
        self._dynamic = dynamic
        self._options = {**(options or {}), "guard_filter_fn": _serialisable_guards}
        self._kinds: dict[type[torch.nn.Module], _Kind] = {}
        if ahead_of_time and not ahead_of_time_compiles():
            log.warning("torch %s has no AOT compile: block graphs are traced at every start", torch.__version__)
            ahead_of_time = False
        folder.mkdir(parents=True, exist_ok=True)
        blocks = [block for block in module.modules() if type(block).__name__ in regions]
        for cls in dict.fromkeys(type(block) for block in blocks):
            self._kinds[cls] = _Kind(self._load(cls)) if ahead_of_time else _Kind(fallback=self._dynamo(cls))
        for block in blocks:
            block._compiled_call_impl = partial(self._call, block)
        self.blocks = len(blocks)

    def _load(self, cls: type[torch.nn.Module]) -> list[Any]:
        from torch._dynamo.aot_compile import AOTCompiledFunction

        graphs = []
        for path in sorted(self.folder.glob(f"{_class_name(cls)}-*.bin")):
            try:
                graphs.append(AOTCompiledFunction.deserialize(path.read_bytes(), cls.forward.__globals__))
            except Exception as exc:  # written by another build, or damaged: compiled again when met
                log.warning("compiled block %s not loaded (%s): removed", path.name, exc)
                path.unlink(missing_ok=True)
        self.loaded += len(graphs)
        return graphs

    def _call(self, block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():  # graphs are compiled for inference only
            return block._call_impl(*args, **kwargs)  # type: ignore[no-untyped-call]  # hooks and forward, uncompiled
        kind = self._kinds[type(block)]
        for graph in kind.graphs:
            if graph.guard_check(block, *args, **kwargs):
                return graph.fn(block, *args, **kwargs)
        if kind.fallback is None:
            compiled = self._compile(block, args, kwargs)
            if compiled is not None:
                return compiled.fn(block, *args, **kwargs)
        assert kind.fallback is not None  # set by _compile when it could not compile the block ahead of time
        self._mark_rows(args, kwargs)
        return kind.fallback(block, *args, **kwargs)

    def _compile(self, block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any | None:
        cls = type(block)
        kind = self._kinds[cls]
        self._mark_rows(args, kwargs)
        # Static shapes but for the marked rows: without this, dynamo's profile of earlier runs (kept in the cache)
        # would make the sizes it saw change symbolic, so a restart compiled other graphs than the first start.
        settings = {"automatic_dynamic_shapes": False}
        if hasattr(torch._dynamo.config, "enable_aot_compile"):  # off by default in earlier torch releases
            settings["enable_aot_compile"] = True
        with _compiling, torch._dynamo.config.patch(settings):
            try:
                # A copy: torch.compile takes guard_filter_fn out of the options it is given.
                options = dict(self._options)
                compiler = torch.compile(cls.forward, fullgraph=True, dynamic=self._dynamic, options=options)
                graph = compiler.aot_compile(((block, *args), kwargs))  # type: ignore[attr-defined]
                data = type(graph).serialize(graph).serialized_data
            except Exception as exc:
                log.warning("%s not compiled ahead of time (%s): compiled by dynamo instead", cls.__name__, exc)
                kind.fallback = self._dynamo(cls)
                return None
        kind.graphs.append(graph)
        self._on_compile()
        name = f"{_class_name(cls)}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
        partial_path = self.folder / f"{name}.partial"
        partial_path.write_bytes(data)
        partial_path.replace(self.folder / name)
        return graph

    def _dynamo(self, cls: type[torch.nn.Module]) -> Callable[..., Any]:
        """The block class's forward compiled by dynamo, with its graphs in memory only (traced at every start)."""
        options = {key: value for key, value in self._options.items() if key != "guard_filter_fn"}
        return torch.compile(cls.forward, dynamic=self._dynamic, options=options)

    def _mark_rows(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The first dimension of every input with the rows of the block's first input, symbolic (marks are
        read when a compile starts)."""
        if not self._dynamic_rows:
            return
        rows = args[0].shape[0] if args else next(iter(kwargs.values())).shape[0]
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
                torch._dynamo.maybe_mark_dynamic(value, 0)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
