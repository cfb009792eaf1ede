"""Block graphs kept as files (engines.regions): what a restart loads, which shapes and weights a kept graph
serves, and what happens to a block that cannot be captured whole."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from engines.regions import FOLDER, CompiledRegions
from tests.helpers import on_a_thread


class Whole(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return torch.nn.functional.gelu(self.linear(hidden)) * scale


class Broken(Whole):
    def forward(self, hidden: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        hidden = self.linear(hidden)
        torch._dynamo.graph_break()  # cannot be one graph
        return hidden.relu() * scale


class Net(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = torch.nn.ModuleList([Whole(), Whole(), Broken()])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


def test_a_restart_loads_the_kept_graphs_and_runs_any_row_count_and_weights_without_compiling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both Whole blocks share one graph, compiled once with symbolic rows and written to a file; the block
    that cannot be captured whole is compiled by dynamo instead, with a warning, and keeps its output. A restart
    (a new module with other weights) loads the file and compiles nothing for 2, 5 or 8 rows, and its outputs
    are its own weights' (the weights are the graph's inputs, not baked in). With grad enabled blocks run
    eagerly and compile nothing."""
    caplog.set_level(logging.WARNING, logger="engines.regions")
    folder = tmp_path / "cache" / FOLDER
    regions = frozenset({"Whole", "Broken"})
    compiled: list[str] = []
    outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"first": [], "restart": []}

    def start(name: str, seed: int) -> CompiledRegions:
        net, eager = Net(seed), Net(seed)
        kept = CompiledRegions(net, regions, folder, lambda: compiled.append(name), dynamic_rows=True)
        with torch.no_grad():
            for rows in (2, 5, 8):
                hidden = torch.randn(rows, 3, 8)
                outputs[name].append((net(hidden), eager(hidden)))
        with torch.enable_grad():
            net(torch.randn(3, 3, 8))
        return kept

    first: list[CompiledRegions] = []
    on_a_thread(lambda: first.append(start("first", seed=1)))
    assert compiled == ["first"] and first[0].loaded == 0 and first[0].blocks == 3
    assert [path.name.split("-")[0] for path in folder.glob("*.bin")] == [f"{__name__}.Whole"]
    assert "Broken not compiled ahead of time" in caplog.text

    restarted: list[CompiledRegions] = []
    on_a_thread(lambda: restarted.append(start("restart", seed=2)))
    assert compiled == ["first"] and restarted[0].loaded == 1
    for name in ("first", "restart"):
        for got, expected in outputs[name]:
            torch.testing.assert_close(got, expected)
    restart_output, _ = outputs["restart"][0]
    assert not torch.allclose(outputs["first"][0][0], restart_output)  # other weights, other outputs


def test_without_ahead_of_time_compiles_blocks_are_compiled_by_dynamo_and_nothing_is_kept(tmp_path: Path) -> None:
    """As for quantised weights: the blocks are compiled by dynamo, in memory only, with the same outputs."""
    from torch._dynamo.utils import counters

    folder = tmp_path / FOLDER
    compiled: list[int] = []
    graphs = counters["stats"]["unique_graphs"]

    def run() -> None:
        net, eager = Net(3), Net(3)
        CompiledRegions(net, frozenset({"Whole"}), folder, lambda: compiled.append(1), True, ahead_of_time=False)
        with torch.no_grad():
            for rows in (2, 4):
                hidden = torch.randn(rows, 3, 8)
                torch.testing.assert_close(net(hidden), eager(hidden))

    on_a_thread(run)
    assert compiled == [] and list(folder.glob("*")) == []
    assert counters["stats"]["unique_graphs"] > graphs  # traced by dynamo
