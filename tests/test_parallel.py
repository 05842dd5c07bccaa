"""Tensor and pipeline parallelism over a system (issue "Many devices")."""

from __future__ import annotations

import json

import pytest

from simulator.api import simulate
from simulator.cli import main
from simulator.hardware.system import load_system
from simulator.parallel import Parallelism, run_pipeline, split_pipeline, split_tensor
from simulator.workload.cache import get_trace
from simulator.workload.trace import Trace
from workloads.config import resolve_model

FOUR = {"num_hidden_layers": "4"}


def _trace(phase: str = "decode", layers: str = "4") -> Trace:
    cfg = resolve_model("llama2-7b", {"num_hidden_layers": layers})
    return get_trace(cfg, phase, 2, 256 if phase == "decode" else 0,
                     128 if phase == "prefill" else 0)


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_tp1_pp1_on_a_system_is_the_single_chip_to_the_last_digit(phase: str) -> None:
    kw = {"model_set": FOUR, "phase": phase, "batch": 2}
    chip = simulate("gpu_a100.yaml", "llama2-7b", **kw)
    system = simulate("dgx_a100.yaml", "llama2-7b", **kw)
    for field in ("latency_s", "tokens_per_s", "energy_j", "power_w", "memory_bytes",
                  "dram_bytes", "tokens"):
        assert getattr(system, field) == getattr(chip, field), field
    assert system.system is not None and system.system.devices == 1
    assert "system" not in json.loads(chip.to_json())  # a chip's JSON is as it was


def test_tensor_split_divides_linears_heads_and_cache_and_adds_two_allreduces() -> None:
    trace = _trace()
    device = split_tensor(trace, 4)
    linears = [op for op in trace.ops if op.kind == "matmul" and op.layer.startswith("layers")]
    split = [op for op in device.ops if op.kind == "matmul" and op.layer.startswith("layers")]
    assert sum(op.weight_bytes for op in split) * 4 == sum(op.weight_bytes for op in linears)
    reduces = [op for op in device.ops if op.name == "allreduce"]
    assert len(reduces) == 2 * 4  # after o_proj and down_proj of every block
    assert all(op.input_bytes == 2 * 4096 * 2 for op in reduces)  # the whole hidden state
    attention = next(op for op in device.ops if op.kind == "attention")
    assert attention.dims["heads"] == 8 and attention.dims["kv_heads"] == 8
    assert device.state_bytes * 4 == trace.state_bytes
    assert [op.name for op in device.ops].count("allgather") == 1  # the LM head's logits
    assert all(d < op.index for op in device.ops for d in op.deps)


def test_tensor_parallel_decode_reads_a_quarter_of_the_weights_and_pays_its_allreduces(
) -> None:
    one = simulate("dgx_a100.yaml", "llama2-7b", model_set=FOUR, runtime="cuda_graphs")
    four = simulate("dgx_a100.yaml", "llama2-7b", model_set=FOUR, runtime="cuda_graphs",
                    tp=4)
    assert four.system is not None and four.system.tp == 4
    reduce = next(c for c in four.system.collectives if c.collective == "allreduce")
    assert reduce.count == 8 and reduce.time_s > 0
    assert four.latency_s < one.latency_s  # a quarter of the weight bytes per device
    assert four.latency_s > one.latency_s / 4 + reduce.time_s * 0.9
    trace = _trace()
    split = sum(op.weight_bytes for op in trace.ops if op.kind == "matmul" and op.layer != "embed")
    assert four.system.device_weights_bytes == one.weights_bytes - split + split // 4


def test_uniform_pipeline_bubbles_are_p_minus_1_over_m_plus_p_minus_1() -> None:
    system, _ = load_system("dgx_a100.yaml")
    alpha = system.links[0].latency.seconds * 1e9
    instant = system.model_copy(update={"links": (system.links[0].model_copy(
        update={"latency": type(system.links[0].latency)()}),)})
    for p, m in ((2, 1), (4, 4), (8, 3)):
        pipe = run_pipeline(instant, Parallelism(1, p, m), [1000.0] * p, 0.0)
        assert pipe.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), rel=1e-12)
        assert pipe.makespan_ns == pytest.approx((m + p - 1) * 1000.0, rel=1e-12)
        # each hand-over adds one link latency to the last micro-batch's path
        late = run_pipeline(system, Parallelism(1, p, m), [1000.0] * p, 0.0)
        assert late.makespan_ns == pytest.approx((m + p - 1) * 1000.0 + (p - 1) * alpha,
                                                 rel=1e-12)


def test_pipeline_stages_split_blocks_evenly_and_hand_on_activations() -> None:
    stages = split_pipeline(_trace(), 2)
    assert [sorted({op.layer for op in s.ops}) for s in stages] == [
        ["embed", "layers.0", "layers.1"], ["layers.2", "layers.3", "lm_head", "norm"]]
    run = simulate("dgx_a100.yaml", "llama2-7b", model_set=FOUR, batch=4, pp=2,
                   micro_batches=2)
    assert run.system is not None
    assert run.system.bubble_fraction == pytest.approx(1 / 3, abs=0.05)
    assert run.tokens == 4 and run.batch == 4
    assert run.latency_s > sum(run.system.stage_latency_s)  # three slots, two stages


@pytest.mark.parametrize(("args", "flag"), [
    (["--tp", "3"], "--tp"),  # 32 heads
    (["--pp", "3"], "--pp"),  # 4 blocks
    (["--tp", "8", "--pp", "2"], "--tp"),  # 16 devices on 8
    (["--batch", "3", "--micro-batches", "2"], "--micro-batches"),
    (["--tp", "0"], "--tp"),
])
def test_impossible_degrees_are_one_line(args: list[str], flag: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hw", "dgx_a100.yaml", "--model", "llama2-7b", "--model-set",
                 "num_hidden_layers=4", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_degrees_on_one_chip_and_moe_tp_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hw", "gpu_a100.yaml", "--model", "tiny-llama", "--tp", "2"]) == 2
    assert main(["--hw", "dgx_a100.yaml", "--model", "mixtral-8x7b", "--model-set",
                 "num_hidden_layers=2", "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "one chip" in err[0] and "MoE" in err[1]


def test_a_model_too_big_for_one_device_names_the_device(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    assert main(["--hw", "dgx_a100.yaml", "--model", "llama2-70b", "--model-set",
                 "num_hidden_layers=80"]) == 2
    err = capsys.readouterr().err.strip()
    assert "one device" in err and "--tp" in err and len(err.splitlines()) == 1


def test_data_parallel_replicas_multiply_throughput_at_a_replicas_latency(
        capsys: pytest.CaptureFixture[str]) -> None:
    one = simulate("dgx_a100.yaml", "llama2-7b", model_set=FOUR, batch=2)
    four = simulate("dgx_a100.yaml", "llama2-7b", model_set=FOUR, batch=8, dp=4)
    assert four.latency_s == one.latency_s and four.system is not None
    assert four.tokens_per_s == pytest.approx(4 * one.tokens_per_s, rel=1e-12)
    assert four.energy_per_token_j == pytest.approx(one.energy_per_token_j, rel=1e-12)
    assert four.memory_bytes == 4 * one.memory_bytes and four.system.devices == 4
    assert main(["--hw", "dgx_a100.yaml", "--model", "llama2-7b", "--model-set",
                 "num_hidden_layers=4", "--batch", "6", "--dp", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dp" in err
