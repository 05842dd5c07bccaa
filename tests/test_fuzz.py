"""Fuzzing the hardware loader and the CLI: every mutation of a shipped file ends in a
simulation or in one line with exit status 2 — never a traceback, a hang or a blow-up."""

from __future__ import annotations

import copy
import io
import signal
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.cli import main

HWCONFIGS = Path(__file__).resolve().parents[1] / "hwconfigs"
FILES = sorted(HWCONFIGS.glob("*.yaml"))
TEXTS = {path.name: path.read_text() for path in FILES}
DATA = {name: yaml.safe_load(text) for name, text in TEXTS.items()}
#: a generous bound on one run; a slower one is treated as a hang
SECONDS = 20

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                         max_size=2),
    st.sampled_from(["0 MHz", "-5 GB/s", "1e30 GHz", "1e-30 B/s", "10 GB", "3 bananas",
                     "nan MHz", "inf GiB", "12", "1 cycle", "0 B", "1e9 cycle", "-1 ns",
                     "100000", "0", "-1", "1e308 W", "0.0000001 bit", "65536 bit"]))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _parent(data: Any, path: tuple) -> tuple[Any, Any]:
    for key in path[:-1]:
        data = data[key]
    return data, path[-1]


@st.composite
def mutated(draw: Any) -> bytes:
    name = draw(st.sampled_from(sorted(DATA)))
    kind = draw(st.sampled_from(["delete", "rename", "replace", "add", "truncate", "bytes",
                                 "alias", "tag", "scale"]))
    text = TEXTS[name]
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text)))].encode()
    if kind == "bytes":
        raw = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0x80, 0xFF))
        return bytes(raw)
    if kind == "alias":
        depth = draw(st.integers(3, 9))
        lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, depth)]
        return (text + "\n" + "\n".join(lines) + "\n").encode()
    if kind == "tag":
        return (text + "\nexploit: !!python/object/apply:os.system ['true']\n").encode()
    data = copy.deepcopy(DATA[name])
    path = draw(st.sampled_from(_paths(data)))
    parent, key = _parent(data, path)
    if kind == "delete":
        del parent[key]
    elif kind == "rename" and isinstance(parent, dict):
        parent[f"{key}x"] = parent.pop(key)
    elif kind == "add" and isinstance(parent, dict):
        parent[draw(st.sampled_from(["speed", "cache", "count", "extra"]))] = 1
    elif kind == "scale" and isinstance(parent[key], str) and parent[key][:1].isdigit():
        number, _, unit = parent[key].partition(" ")
        factor = draw(st.sampled_from([0, -1, 1e-12, 1e12, 1e300]))
        parent[key] = f"{float(number) * factor} {unit}".strip()
    else:
        parent[key] = draw(VALUES)
    return yaml.safe_dump(data, allow_unicode=True).encode()


class Hang(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise Hang


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue(), err.getvalue()


def names_file_or_flag(line: str, path: Path) -> bool:
    """The error names the file (with line or field) or a flag, then says what was wrong."""
    where, sep, message = line.removeprefix("simulate: error: ").partition(": ")
    return bool(sep and message.strip()) and (where.startswith(str(path))
                                               or where.startswith("--"))


def test_error_lines_must_say_where() -> None:
    path = Path("/tmp/hw.yaml")
    assert names_file_or_flag("simulate: error: /tmp/hw.yaml:3: clock: expected a frequency", path)
    assert names_file_or_flag("simulate: error: --model: tiny needs 2 GiB", path)
    assert not names_file_or_flag("simulate: error: something went wrong: 3", path)
    assert not names_file_or_flag("simulate: error: /tmp/hw.yaml", path)


def check(path: Path) -> None:
    code, out, err = run_cli(["--hw", str(path), "--model", "tiny", "--format", "json"])
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("simulate: error: "), err
        assert names_file_or_flag(lines[0], path), err
    else:
        assert out.lstrip().startswith("{") and not err


@settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "500")),
          deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])
@given(content=mutated())
def test_mutated_hardware_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "hw.yaml"
    path.write_bytes(content)
    check(path)


@settings(max_examples=200, deadline=None)
@given(args=st.lists(st.sampled_from(
    ["--hw", "fpga_1core.yaml", "--model", "tiny", "--batch", "0", "-1", "99999999",
     "--context", "--prompt", "--phase", "prefill", "decode", "train", "--mapping", "batch",
     "--hw-set", "clock=1 GHz", "clock=abc", "cores.count=0", "memory=1", "--model-set",
     "hidden_size=0", "torch_dtype=float32", "vocab_size=x", "--format", "xml", "json",
     "--granularity", "0", "3", "schema", "trace", "op", "check",
     "sweep", "--trace", "/", "--plot", ""]), max_size=8))
def test_random_command_lines(args: list[str]) -> None:
    code, _, err = run_cli(args)
    assert code in (0, 1, 2)
    if code == 2:
        assert len(err.strip().splitlines()) == 1


def test_python_tags_never_execute(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "hw.yaml"
    path.write_text(TEXTS["fpga_1core.yaml"]
                    + f"\nx: !!python/object/apply:os.system ['touch {marker}']\n")
    check(path)
    assert not marker.exists()


if __name__ == "__main__":  # pragma: no cover - used by benchmarks/fuzz.py
    sys.exit(pytest.main([__file__, "-q", "-k", "mutated"]))


@pytest.mark.parametrize("chip", ['""', "gpu_a10.yaml", "/nonexistent/chip.yaml"])
def test_a_system_whose_chip_cannot_be_found_names_its_own_field(tmp_path: Path,
                                                                  chip: str) -> None:
    path = tmp_path / "hw.yaml"
    path.write_text(TEXTS["hgx_a100_4gpu.yaml"].replace("chip: gpu_a100.yaml",
                                                        f"chip: {chip}"))
    code, _, err = run_cli(["--hw", str(path), "--model", "tiny"])
    assert code == 2 and err.startswith(f"simulate: error: {path}: devices.chip: "), err
    check(path)
