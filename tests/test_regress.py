"""`simulate regress`: a 10 % clock change in a copy of a shipped file fails readably."""

import shutil
from pathlib import Path

import pytest

from simulator.cli import main

HWCONFIGS = Path(__file__).resolve().parents[1] / "hwconfigs"


def copy_of(tmp_path: Path, name: str, clock: str | None = None) -> Path:
    folder = tmp_path / "hw"
    folder.mkdir()
    target = folder / name
    shutil.copy(HWCONFIGS / name, target)
    if clock:
        text = target.read_text()
        assert "clock: 60 MHz" in text
        target.write_text(text.replace("clock: 60 MHz", f"clock: {clock}", 1))
    return folder


def test_unchanged_copy_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["regress", "--hw-dir", str(copy_of(tmp_path, "fpga_8core.yaml"))]) == 0
    assert "within 1.0%" in capsys.readouterr().out


def test_clock_up_10_percent_fails_with_a_diff(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_of(tmp_path, "fpga_8core.yaml", clock="66 MHz")
    assert main(["regress", "--hw-dir", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "moved by more than 1.0%" in out
    header, *rows = out.splitlines()[1:]
    assert header.split() == ["hardware", "model", "phase", "metric", "old", "new", "change"]
    latency = next(r for r in rows if "1.3b" in r and "latency_s" in r)
    assert latency.startswith("fpga_8core.yaml") and "%" in latency
    assert float(latency.split()[-1].rstrip("%")) < -5  # faster clock: lower latency


def test_update_writes_a_baseline_and_errors_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_of(tmp_path, "fpga_1core.yaml")
    baseline = tmp_path / "out" / "baseline.csv"
    (tmp_path / "out").mkdir()
    assert main(["regress", "--hw-dir", str(folder), "--baseline", str(baseline),
                 "--update"]) == 0
    assert baseline.read_text().startswith("hardware,model,phase,latency_s")
    assert main(["regress", "--hw-dir", str(folder), "--baseline", str(baseline)]) == 0
    capsys.readouterr()
    assert main(["regress", "--baseline", str(tmp_path / "none.csv"), "--hw-dir",
                 str(folder)]) == 2
    assert "simulate regress --update" in capsys.readouterr().err
    assert main(["regress", "--hw-dir", str(tmp_path / "nope")]) == 2
