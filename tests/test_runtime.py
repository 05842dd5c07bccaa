"""The host runtime a GPU models: eager launches per kernel, or one CUDA graph per step."""

import json

import pytest
from pydantic import ValidationError
from rich.console import Console

from simulator.api import run_trace, simulate, with_runtime
from simulator.cli import main
from simulator.errors import UserError
from simulator.hardware import load_hardware
from simulator.hardware.schema import Overheads
from simulator.table import render
from simulator.workload.cache import get_trace
from workloads.config import resolve_model

A100 = load_hardware("gpu_a100.yaml")
def _latency_and_kernels(runtime: str, phase: str = "decode") -> tuple[float, int]:
    trace = get_trace(resolve_model("tiny-llama"), phase, 1, 16 if phase == "decode" else 0,
                      16 if phase == "prefill" else 0)
    result, tasks, _ = run_trace(with_runtime(A100, runtime), trace)
    return result.latency_s, sum(len(task.stages) for task in tasks)


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_cuda_graphs_saves_exactly_the_launches(phase: str) -> None:
    """On one stream every kernel waits for its launch, so the step shortens by
    kernels × (launch − graph_kernel_gap) and lengthens by the one graph_launch."""
    eager, kernels = _latency_and_kernels("eager", phase)
    graphs, same_kernels = _latency_and_kernels("cuda_graphs", phase)
    overheads = A100.overheads
    assert overheads.graph_launch is not None
    launch, gap = overheads.launch.seconds, overheads.graph_kernel_gap.seconds
    expected = kernels * (launch - gap) - overheads.graph_launch.seconds
    assert same_kernels == kernels > 0
    assert eager - graphs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert graphs < eager


def test_every_gpu_file_defaults_to_eager_with_graphs_declared() -> None:
    for name in ("gpu_a100.yaml", "gpu_a100_40gb.yaml", "gpu_h100.yaml"):
        overheads = load_hardware(name).overheads
        assert overheads.runtime == "eager"
        assert overheads.runtimes() == ("eager", "cuda_graphs")
        assert overheads.launch.seconds == pytest.approx(3e-6)


def test_fpga_files_declare_no_runtime() -> None:
    overheads = load_hardware("fpga_8core.yaml").overheads
    assert overheads.runtime is None and overheads.runtimes() == ()


def test_runtime_none_and_eager_agree_on_a_gpu() -> None:
    assert (simulate(A100, "tiny-llama", context=16).latency_s
            == simulate(A100, "tiny-llama", context=16, runtime="eager").latency_s)


def test_json_carries_the_runtime(capsys: pytest.CaptureFixture[str]) -> None:
    runs = {"eager": ["--hw", "gpu_a100.yaml", "--model", "tiny-llama"],
            "cuda_graphs": ["--hw", "gpu_a100.yaml", "--model", "tiny-llama",
                            "--runtime", "cuda_graphs"],
            None: ["--hw", "fpga_8core.yaml", "--model", "tiny"]}
    for runtime, args in runs.items():
        assert main([*args, "--context", "16", "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["runtime"] == runtime


def test_table_names_the_runtime() -> None:
    console = Console(record=True, width=120)
    render(simulate(A100, "tiny-llama", context=16, runtime="cuda_graphs"), console)
    text = console.export_text()
    assert "runtime" in text and "cuda_graphs (one graph launch per step)" in text


@pytest.mark.parametrize("runtime", ["cuda_graphs", "eager"])
def test_a_runtime_on_an_fpga_is_one_line_naming_the_flag(
        runtime: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hw", "fpga_8core.yaml", "--model", "tiny", "--runtime", runtime]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = load_hardware("fpga_8core.yaml").name
    assert len(err) == 1 and "--runtime" in err[0] and name in err[0]


def test_an_unknown_runtime_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hw", "gpu_a100.yaml", "--model", "tiny-llama", "--runtime", "graphs"]) == 2
    assert "--runtime" in capsys.readouterr().err
    with pytest.raises(UserError, match="--runtime"):
        with_runtime(A100, "graphs")


def test_graphs_need_a_graph_launch_and_a_runtime() -> None:
    with pytest.raises(ValidationError, match="graph_launch"):
        Overheads(runtime="cuda_graphs")
    with pytest.raises(ValidationError, match=r"overheads\.runtime"):
        Overheads(graph_launch="10 us")
    eager_only = A100.model_copy(update={"overheads": Overheads(runtime="eager", launch="3 us")})
    with pytest.raises(UserError, match="graph_launch"):
        with_runtime(eager_only, "cuda_graphs")

