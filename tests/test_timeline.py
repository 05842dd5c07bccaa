"""Chrome/Perfetto timelines: structure, tracks that never overlap, determinism."""

import itertools
import json
from collections import defaultdict
from pathlib import Path

import pytest

from simulator.cli import main


def load(tmp_path: Path, *args: str) -> dict:
    path = tmp_path / "trace.json"
    assert main([*args, "--trace", str(path), "--format", "json"]) == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize("args", [
    ("--hw", "fpga_8core.yaml", "--model", "tiny"),
    ("--hw", "fpga_8core.yaml", "--model", "tiny", "--mapping", "batch", "--batch", "8"),
    ("--hw", "gpu_a100.yaml", "--model", "tiny-llama", "--phase", "prefill", "--prompt", "64"),
])
def test_trace_structure_and_no_overlap(tmp_path: Path, args: tuple[str, ...],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = load(tmp_path, *args)
    result = json.loads(capsys.readouterr().out)
    events = data["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert any(n.startswith("dram") for n in names.values())
    assert any(n.endswith(".dma") for n in names.values())
    units = {n.split(".", 1)[1] for n in names.values() if n.startswith("core")}
    assert units - {"dma"}  # functional-unit tracks
    process = [e for e in events if e["ph"] == "M" and e["name"] == "process_name"]
    assert len(process) == 1
    slices = [e for e in events if e["ph"] == "X"]
    assert slices and all(e["dur"] > 0 and {"bytes"} <= set(e["args"]) for e in slices)
    assert any("operations" in e["args"] for e in slices)
    by_track = defaultdict(list)
    for e in slices:
        by_track[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for intervals in by_track.values():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end - 1e-6
    last = max(e["ts"] + e["dur"] for e in slices)
    # the step ends with the last slice, or one DRAM access latency (≤ 0.5 µs) after it
    assert result["latency_s"] * 1e6 - 0.5 <= last <= result["latency_s"] * 1e6 + 1e-6
    layers = {e["args"].get("layer") for e in slices}
    assert "layers.0" in layers


def test_same_command_gives_byte_identical_trace(tmp_path: Path) -> None:
    files = []
    for name in ("a.json", "b.json"):
        path = tmp_path / name
        assert main(["--hw", "fpga_8core.yaml", "--model", "tiny", "--trace", str(path),
                     "--format", "json"]) == 0
        files.append(path.read_bytes())
    assert files[0] == files[1]


def test_unwritable_trace_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--hw", "fpga_1core.yaml", "--model", "tiny", "--trace",
                 str(blocker / "trace.json")]) == 2
    assert "--trace" in capsys.readouterr().err
