"""The CLI as a new user meets it: help, version, "did you mean", readable kernel tables,
batch-aware latency labels and a roofline coloured by op kind."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import refused

from simulator.cli import COMMANDS, main

SUBCOMMANDS = [name for name in COMMANDS if name != "help"]


def error_line(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the CLI expecting a usage error: exit 2, nothing on stdout, one stderr line."""
    return refused(capsys, list(args)).strip()


# --- a. help ----------------------------------------------------------------------------------

def test_help_lists_every_command_and_the_main_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert set(SUBCOMMANDS) == {"schema", "trace", "list", "validate", "op", "check", "regress",
                                "sweep", "serve"}
    for name, summary in COMMANDS.items():
        assert f"  {name}" in out and summary in out
    for flag in ("--hw", "--model", "--phase", "--batch", "--context", "--prompt", "--mapping",
                 "--format", "--plot", "--version"):
        assert flag in out
    assert out.startswith("usage: simulate --hw HW --model MODEL")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: simulate {command}")
    assert main(["help", command]) == 0
    assert capsys.readouterr().out.startswith(f"usage: simulate {command}")


def test_kernel_help_and_bare_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    for kernel in ("gemm", "attention"):
        assert main(["op", kernel, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: simulate op {kernel}")
    assert "simulate --help" in error_line(capsys)


# --- b. version -------------------------------------------------------------------------------

def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"simulate {version('llm-hwsim')}\n"


# --- c. did you mean --------------------------------------------------------------------------

def test_unknown_hardware_suggests_the_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    line = error_line(capsys, "--hw", "gpu_a10.yaml", "--model", "tiny")
    assert "no hardware file 'gpu_a10.yaml'; did you mean gpu_a100.yaml?" in line
    assert "did you mean fpga_8core.yaml?" in error_line(capsys, "--hw", "fpga8core", "--model",
                                                         "tiny")
    assert "did you mean" not in error_line(capsys, "--hw", "zzz.yaml", "--model", "tiny")


def test_unknown_command_suggests_the_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    line = error_line(capsys, "valdate")
    assert line.startswith("simulate: error: valdate: unknown command; did you mean validate?")
    assert "did you mean sweep?" in error_line(capsys, "swep", "spec.yaml")
    assert "did you mean" in error_line(capsys, "help", "regres")
    assert "simulate --hw HW --model MODEL" in error_line(capsys, "gpu_a100.yaml")


def _write(path: Path, data: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda d: d["cores"].update(cont=d["cores"].pop("count")),
     "cores.cont: unknown key; did you mean count?"),
    (lambda d: d["memory"]["dram"].update(bandwith="1 GB/s"),
     "memory.dram.bandwith: unknown key; did you mean bandwidth_per_channel?"),
    (lambda d: d["cores"]["units"]["mac"].update(opz_per_cycle={}),
     "cores.units.mac.opz_per_cycle: unknown key; did you mean ops_per_cycle?"),
    (lambda d: d["memory"].update(zzzzzz=1), "memory.zzzzzz: unknown key; expected one of dram"),
])
def test_unknown_yaml_key_names_the_nearest(edit: Any, expected: str, tmp_path: Path,
                                            machine_data: dict[str, Any],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    edit(machine_data)
    path = _write(tmp_path / "hw.yaml", machine_data)
    line = error_line(capsys, "--hw", path, "--model", "tiny")
    assert path in line and expected in line


# --- d. simulate op: a table ------------------------------------------------------------------

GEMM = ["op", "gemm", "--hw", "gpu_a100.yaml", "--m", "4096", "--n", "4096", "--k", "4096"]
ATTENTION = ["op", "attention", "--hw", "gpu_a100.yaml", "--batch", "1", "--heads", "2", "--seq",
             "256", "--head-dim", "64", "--causal", "--backward"]


def test_op_gemm_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(GEMM) == 0
    out = capsys.readouterr().out
    for text in ("gemm on nvidia-a100-sxm4-80gb", "M 4096 × N 4096 × K 4096", "bf16",
                 "latency", "µs", "137.4 GFLOP", "TFLOP/s", "bytes from DRAM", "MiB",
                 "arithmetic intensity", "FLOP/byte"):
        assert text in out
    assert "{" not in out and " us" not in out and "e+" not in out


def test_op_attention_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(ATTENTION) == 0
    out = capsys.readouterr().out
    for text in ("attention (forward + backward)", "B 1 × H 2 × S 256 × D 64, causal",
                 "FLOPs (FA-2 count)", "FLOP/s", "arithmetic intensity"):
        assert text in out
    assert "{" not in out


def test_op_json_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*GEMM, "--format", "json"]) == 0
    gemm = json.loads(capsys.readouterr().out)
    assert list(gemm) == ["bytes_moved", "flops", "hardware", "kernel", "latency_s", "shape",
                          "tflops"]
    assert gemm["shape"] == {"batch": 1, "k": 4096, "m": 4096, "n": 4096}
    assert gemm["flops"] == 2 * 4096**3 and gemm["kernel"] == "gemm"
    assert main([*ATTENTION, "--format", "json"]) == 0
    attention = json.loads(capsys.readouterr().out)
    assert list(attention) == list(gemm)
    assert set(attention["shape"]) == {"batch", "causal", "head_dim", "heads", "kv_heads",
                                       "kv_len", "mode", "q_len"}


# --- e. latency labels at batch > 1 -----------------------------------------------------------

def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, dict[str, Any]]:
    """(table, JSON) of one main run."""
    base = ["--hw", "fpga_1core.yaml", "--model", "tiny", *args]
    assert main(base) == 0
    table = capsys.readouterr().out
    assert main([*base, "--format", "json"]) == 0
    return table, json.loads(capsys.readouterr().out)


def test_decode_rows_name_the_batch(capsys: pytest.CaptureFixture[str]) -> None:
    table, data = run(capsys, "--batch", "4", "--context", "16")
    assert "step latency (4 tokens)" in table and "latency per token" not in table
    assert "throughput, 4 sequences" in table and "throughput per sequence" in table
    assert f"{data['tokens_per_s'] / 4:.4g} tokens/s" in table
    assert data["batch"] == 4 and "latency_s" in data  # the JSON's names are unchanged
    assert data["tokens_per_s"] == pytest.approx(4 / data["latency_s"])
    single, _ = run(capsys, "--context", "16")
    assert "latency per token (decode step)" in single and "per sequence" not in single


def test_prefill_rows_say_the_whole_batch(capsys: pytest.CaptureFixture[str]) -> None:
    table, data = run(capsys, "--phase", "prefill", "--batch", "2", "--prompt", "8")
    assert "prefill latency (2 × 8 tokens)" in table
    assert "time per prompt token (÷ 16)" in table
    assert "throughput, 2 prompts" in table and "throughput per prompt" in table
    assert data["tokens_per_s"] == pytest.approx(16 / data["latency_s"])


# --- f. roofline by op kind -------------------------------------------------------------------

def test_roofline_legend_names_op_kinds() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulator import load_hardware, simulate
    from simulator.plots import KIND_COLOURS, roofline

    result = simulate("gpu_a100.yaml", "tiny-llama", context=16)
    fig, ax = plt.subplots()
    try:
        roofline(result, load_hardware("gpu_a100.yaml"), ax)
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert {"matmul", "attention", "norm", "elementwise"} <= set(labels)
        assert "roof: tensor (bf16)" in labels
        colours = {c.get_label(): tuple(c.get_facecolor()[0]) for c in ax.collections}
        assert len(set(colours.values())) == len(colours)  # one colour per kind
        assert set(colours) <= set(KIND_COLOURS)
        roofline(result, load_hardware("gpu_h100.yaml"), ax, label="H100")
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert "matmul, H100" in labels
        markers = {c.get_gid() for c in ax.collections}
        assert len(markers) == 2  # a second machine on the same Axes gets its own marker
    finally:
        plt.close(fig)
