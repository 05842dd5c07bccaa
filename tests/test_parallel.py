"""Tensor and pipeline parallelism over a system (issue "Many devices")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulator.api import simulate
from simulator.cli import main
from simulator.hardware.system import load_system
from simulator.parallel import (
    Parallelism,
    run_pipeline,
    split_pipeline,
    split_tensor,
    tile_attention,
)
from simulator.sequence import split_sequence
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
    (["--pp-interleave", "2"], "--pp-interleave"),  # no pipeline
    (["--pp", "2", "--batch", "3", "--micro-batches", "3", "--pp-interleave", "2"],
     "--pp-interleave"),  # micro-batches not a multiple of --pp
    (["--pp", "2", "--batch", "2", "--micro-batches", "2", "--pp-interleave", "4"],
     "--pp-interleave"),  # 8 virtual stages, 4 blocks
    (["--sp", "2"], "--sp"),  # decode
    (["--phase", "prefill", "--prompt", "128", "--sp", "3"], "--sp"),  # 32 heads
    (["--phase", "prefill", "--prompt", "100", "--sp", "8"], "--sp"),  # 100 tokens
    (["--phase", "prefill", "--prompt", "128", "--sp", "2", "--tp", "2"], "--sp"),
    (["--tp", "2", "--tp-overlap", "2"], "--tp-overlap"),  # decode
    (["--phase", "prefill", "--prompt", "128", "--tp-overlap", "2"], "--tp-overlap"),
    (["--phase", "prefill", "--prompt", "100", "--tp", "2", "--tp-overlap", "8"],
     "--tp-overlap"),
    (["--phase", "prefill", "--prompt", "128", "--tp", "2", "--tp-overlap", "2", "--mapping",
      "batch"], "--tp-overlap"),  # collectives off one stream
    (["--tp-sp"], "--tp-sp"),  # no --tp
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


def test_interleaved_pipeline_bubbles_are_p_minus_1_over_vm_plus_p_minus_1() -> None:
    """Megatron-LM's interleaved schedule: V virtual stages per device, each 1/V of a
    stage's work, shrink the bubble to (p − 1)/(V·m + p − 1)."""
    system, _ = load_system("dgx_a100.yaml")
    instant = system.model_copy(update={"links": (system.links[0].model_copy(
        update={"latency": type(system.links[0].latency)()}),)})
    for p, m, v in ((2, 2, 2), (4, 4, 2), (4, 8, 3), (2, 6, 4)):
        par = Parallelism(1, p, m, interleave=v)
        pipe = run_pipeline(instant, par, [1000.0 / v] * (p * v), 0.0)
        assert pipe.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), rel=1e-9)
        plain = run_pipeline(instant, Parallelism(1, p, m), [1000.0] * p, 0.0)
        assert pipe.makespan_ns < plain.makespan_ns
    run = simulate("dgx_a100.yaml", "llama2-7b", model_set=FOUR, batch=4, pp=2,
                   micro_batches=2, pp_interleave=2)
    assert run.system is not None and run.system.interleave == 2
    assert len(run.system.stage_latency_s) == 2
    flat = simulate("dgx_a100.yaml", "llama2-7b", model_set=FOUR, batch=4, pp=2,
                    micro_batches=2)
    assert run.system.device_weights_bytes == flat.system.device_weights_bytes  # type: ignore[union-attr]
    assert run.system.bubble_fraction < flat.system.bubble_fraction  # type: ignore[union-attr]



def test_ulysses_splits_tokens_and_re_splits_attention_by_heads() -> None:
    trace = _trace("prefill")
    device = split_sequence(trace, 4)
    attention = [op for op in device.ops if op.kind == "attention"]
    assert all(op.dims["heads"] == 8 and op.dims["q_len"] == 128 for op in attention)
    moves = [op for op in device.ops if op.kind == "collective"]
    assert [op.fn for op in moves] == ["alltoall"] * 8  # before and after each attention
    q = 2 * 128 * 4096 * 2  # batch 2, 128 tokens, hidden 4096, fp16
    assert [op.input_bytes for op in moves[:2]] == [3 * q // 4, q // 4]
    assert device.state_bytes * 4 == trace.state_bytes
    assert sum(op.weight_bytes for op in device.ops) == sum(op.weight_bytes for op in trace.ops)
    mm = [op for op in device.ops if op.kind == "matmul"]
    assert mm[0].dims["m"] * 4 == next(op for op in trace.ops if op.kind == "matmul").dims["m"]
    assert all(d < op.index for op in device.ops for d in op.deps)
    one = simulate("dgx_a100.yaml", "llama2-7b", model_set=FOUR, phase="prefill", prompt=1024)
    four = simulate("dgx_a100.yaml", "llama2-7b", model_set=FOUR, phase="prefill",
                    prompt=1024, sp=4)
    assert four.system is not None and four.system.sp == 4 and four.system.devices == 4
    assert one.latency_s / 4 < four.latency_s < one.latency_s / 2




def test_a_system_trace_draws_every_device_its_links_and_the_hand_overs(tmp_path: Path
                                                                         ) -> None:
    out = tmp_path / "step.json"
    run = simulate("dgx_a100.yaml", "llama2-7b", model_set=FOUR, batch=4, tp=2, pp=2,
                   micro_batches=2, trace_file=out)
    events = json.loads(out.read_text())["traceEvents"]
    names = [e["args"]["name"] for e in events if e["name"] == "process_name"]
    assert names[:4] == [f"device {d} (stage {d // 2}, rank {d % 2})" for d in range(4)]
    slices = [e for e in events if e["ph"] == "X"]
    end_us = max(e["ts"] + e["dur"] for e in slices)
    assert end_us == pytest.approx(run.latency_s * 1e6, rel=1e-9)
    for device in range(4):
        mine = [e for e in slices if e["pid"] == device + 1]
        assert {e["args"]["micro_batch"] for e in mine} == {0, 1}
        assert sum(e["name"].endswith("(allreduce)") for e in mine) == 2 * 2 * 2  # 2 blocks
    hand_overs = [e for e in slices if e["pid"] == 5]
    assert len(hand_overs) == 2  # one boundary, two micro-batches


def test_a_system_run_plots_one_micro_batchs_path(tmp_path: Path) -> None:
    simulate("dgx_a100.yaml", "llama2-7b", model_set=FOUR, tp=2, pp=2, plot_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.png", "roofline.png"]


def test_tiling_allreduce_cuts_attention_into_query_tiles_whose_reduces_overlap() -> None:
    device = split_tensor(_trace("prefill"), 4)
    tiled = tile_attention(device, 4)
    for layer in ("layers.0", "layers.3"):
        attention = [op for op in tiled.ops if op.kind == "attention" and op.layer == layer]
        whole = next(op for op in device.ops if op.kind == "attention" and op.layer == layer)
        assert [op.dims["q_len"] for op in attention] == [32] * 4
        assert sum(op.dims["pairs"] for op in attention) == whole.dims["pairs"]  # causal rows
        reduces = [op for op in tiled.ops if op.kind == "collective" and op.layer == layer]
        assert [op.dims.get("overlap", 0) for op in reduces] == [1, 1, 1, 1, 0]  # MLP's whole
        assert reduces[0].input_bytes * 4 == next(
            op for op in device.ops if op.kind == "collective" and op.layer == layer).input_bytes
    assert all(d < op.index for op in tiled.ops for d in op.deps)
    kw = {"model_set": FOUR, "phase": "prefill", "prompt": 2048, "tp": 8}
    plain = simulate("dgx_a100.yaml", "llama2-7b", **kw)
    overlapped = simulate("dgx_a100.yaml", "llama2-7b", **kw, tp_overlap=4)
    assert overlapped.latency_s < plain.latency_s



def test_megatron_sequence_parallelism_trades_each_allreduce_for_a_scatter_and_a_gather(
) -> None:
    trace = _trace("prefill")
    device = split_tensor(trace, 4, sequence=True)
    kinds = [op.fn for op in device.ops if op.kind == "collective"]
    assert kinds.count("reducescatter") == 2 * 4 and "allreduce" not in kinds
    assert kinds.count("allgather") == 2 * 4 + 1 + 1  # before q/k/v and gate/up, LM head
    hidden = 2 * 128 * 4096 * 2  # batch 2, 128 tokens, fp16
    assert {op.input_bytes for op in device.ops if op.fn == "reducescatter"} == {hidden}
    norms = [op for op in device.ops if op.kind == "norm"]
    assert all(op.output_bytes * 4 == hidden for op in norms)
    assert all(d < op.index for op in device.ops for d in op.deps)
    kw = {"model_set": FOUR, "phase": "prefill", "prompt": 2048, "tp": 8}
    plain = simulate("dgx_a100.yaml", "llama2-7b", **kw)
    split = simulate("dgx_a100.yaml", "llama2-7b", **kw, tp_sp=True)
    assert split.latency_s < plain.latency_s
    assert split.system is not None and plain.system is not None
    assert split.system.communication_s == pytest.approx(plain.system.communication_s, rel=0.05)
