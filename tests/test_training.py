"""Training steps: the backward's FLOPs, recomputation, the optimizer, memory over the step,
and an inference capture untouched by any of it."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from cli_helpers import refused

from simulator.cli import main
from simulator.hardware import load_hardware
from simulator.training import simulate_training
from simulator.training.flops import model_flops
from simulator.workload.capture import capture
from simulator.workload.lora import parse_lora
from simulator.workload.trace import MATRIX_KINDS, Op
from simulator.workload.training import (
    OPTIMIZER_OPS,
    TrainingTrace,
    capture_training,
    get_training_trace,
)
from workloads import ops
from workloads.config import resolve_model

GPT2 = ("gpt2", {"n_layer": "2"})
LLAMA = ("llama2-7b", {"num_hidden_layers": "2"})
MODELS = [GPT2, LLAMA]


def _cfg(model: tuple[str, dict[str, str]]):
    return resolve_model(model[0], model[1], None)


@pytest.fixture(scope="module")
def traces() -> dict[tuple[str, str], TrainingTrace]:
    return {(name, recompute): capture_training(_cfg((name, sets)), 2, 64, recompute)
            for name, sets in MODELS for recompute in ("none", "full", "selective")}


def _weight_matmuls(ops_: tuple[Op, ...], stage: str) -> dict[str, int]:
    flops: dict[str, int] = defaultdict(int)
    for op in ops_:
        if op.stage == stage and op.kind == "matmul":
            flops[op.module] += op.ops
    return dict(flops)


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
def test_backward_of_every_linear_is_twice_its_forward(traces, name: str) -> None:
    """Per linear layer: activation-gradient GEMMs = weight-gradient GEMMs = forward GEMM
    FLOPs, exactly (so the backward is 2 × the forward)."""
    trace = traces[(name, "none")].trace
    linears = {op.module: op.ops for op in trace.ops
               if op.stage == "fwd" and op.kind == "matmul" and op.weight_bytes}
    assert len(linears) >= 8
    act, weight = _weight_matmuls(trace.ops, "bwd_act"), _weight_matmuls(trace.ops, "bwd_weight")
    for module, forward in linears.items():
        assert act.get(module) == forward, module
        assert weight.get(module) == forward, module
    assert set(weight) == set(linears)  # no weight-gradient GEMM outside a linear


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
def test_attention_backward_counts_two_and_a_half_forwards(traces, name: str) -> None:
    trace = traces[(name, "none")].trace
    fwd = [op for op in trace.ops if op.kind == "attention" and op.stage == "fwd"]
    bwd = [op for op in trace.ops if op.kind == "attention" and op.stage == "bwd_act"]
    assert len(fwd) == len(bwd) == 2
    for f, b in zip(fwd, reversed(bwd), strict=True):
        assert b.dims["backward"] == 1 and b.module == f.module
        assert b.ops == 2.5 * f.ops


def _signature(op: Op) -> tuple:
    return (op.module, op.fn, op.ops, op.weight_bytes, op.input_bytes, op.output_bytes,
            tuple(sorted(op.dims.items())))


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_adds_exactly_the_recomputed_forward(traces, name: str,
                                                       recompute: str) -> None:
    base, checkpointed = traces[(name, "none")].trace, traces[(name, recompute)].trace
    again = [op for op in checkpointed.ops if op.stage == "recompute"]
    assert again
    forward = Counter(_signature(op) for op in base.ops if op.stage == "fwd")
    assert not Counter(_signature(op) for op in again) - forward  # each a forward op again
    for stage in ("fwd", "bwd_act", "bwd_weight", "optim"):
        assert (sum(op.ops for op in base.ops if op.stage == stage)
                == sum(op.ops for op in checkpointed.ops if op.stage == stage)), stage
    if recompute == "selective":
        assert {op.fn for op in again} == {"attention"}
    else:  # every block re-runs its forward; nothing outside the blocks does
        assert {op.layer for op in again} == {op.layer for op in base.ops
                                               if op.stage == "fwd" and op.layer[-1].isdigit()}


def test_backward_ops_belong_to_their_modules(traces) -> None:
    trace = traces[("llama2-7b", "none")].trace
    norms = [op for op in trace.ops if op.fn == "rms_norm_backward"]
    assert [op.module for op in norms] == ["norm", "layers.1.mlp_norm", "layers.1.attn_norm",
                                           "layers.0.mlp_norm", "layers.0.attn_norm"]
    assert all(op.stage == "bwd_act" for op in norms)


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
def test_optimizer_updates_every_parameter_once(traces, name: str) -> None:
    training = traces[(name, "none")]
    updates = [op for op in training.trace.ops if op.stage == "optim"]
    assert sum(op.dims["numel"] for op in updates) == training.trainable == training.params
    assert all(op.ops == OPTIMIZER_OPS["adamw"] * op.dims["numel"] for op in updates)
    # bf16 weights: an fp32 master copy and AdamW's two fp32 moments
    assert training.master_bytes == 4 * training.params
    assert training.state_bytes == 8 * training.params
    grads = sum(b.bytes for b in training.buffers if b.category == "gradients")
    assert grads == training.grad_bytes == 2 * training.params


def test_backward_kernels_compute_the_gradients() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c, True, 3), (q, k, v))
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    grad = torch.randn_like(y)
    expected = torch.autograd.grad(y, (x, w), grad)
    for got, want in zip(ops.rms_norm_backward(grad, x.detach(), w.detach(), 1e-5), expected,
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_inference_capture_is_untouched_by_training() -> None:
    cfg = _cfg(LLAMA)
    before = capture(cfg, "prefill", 1, 0, 32).to_json()
    capture_training(cfg, 1, 32, "selective")
    capture_training(cfg, 1, 32, "full")
    after = capture(cfg, "prefill", 1, 0, 32).to_json()
    assert before == after
    assert '"stage"' not in after  # inference traces read as they always have


def test_the_training_trace_round_trips_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SIMULATE_CACHE_DIR", str(tmp_path))
    cfg = _cfg(GPT2)
    made = get_training_trace(cfg, 1, 32, "none", "sgd")
    assert list(tmp_path.rglob("*.json"))
    from simulator.workload import cache

    cache._RECENT.clear()
    assert get_training_trace(cfg, 1, 32, "none", "sgd") == made


@pytest.fixture(scope="module")
def a100():
    return load_hardware("gpu_a100.yaml")


def test_full_checkpointing_lowers_the_peak(a100) -> None:
    kwargs = {"batch": 4, "seq_len": 512, "model_set": GPT2[1]}
    plain = simulate_training(a100, "gpt2", **kwargs)
    full = simulate_training(a100, "gpt2", recompute="full", **kwargs)
    assert full.peak_memory_bytes < plain.peak_memory_bytes
    assert full.step_time_s > plain.step_time_s
    assert full.hfu > full.mfu * plain.hfu / plain.mfu  # recompute is hardware work only
    assert full.model_flops == plain.model_flops
    for layer in ("transformer.h.0", "transformer.h.1"):  # a block keeps only its input
        assert full.saved_activation_bytes[layer] == 4 * 512 * 768 * 2
        assert plain.saved_activation_bytes[layer] > 10 * full.saved_activation_bytes[layer]


def test_micro_batches_repeat_the_forward_and_backward(a100) -> None:
    one = simulate_training(a100, "gpt2", batch=4, seq_len=256, model_set=GPT2[1])
    four = simulate_training(a100, "gpt2", batch=4, seq_len=256, micro_batch=1,
                             model_set=GPT2[1])
    single = simulate_training(a100, "gpt2", batch=1, seq_len=256, model_set=GPT2[1])
    micro = single.micro_batch_time_s
    assert four.micro_batch_time_s == micro
    assert four.step_time_s == pytest.approx(4 * micro + single.step_time_s - micro, rel=1e-12)
    assert four.peak_memory_bytes < one.peak_memory_bytes
    peak = four.devices[0].at_peak_bytes
    assert peak["gradients"] in (0, single.devices[0].at_peak_bytes["gradients"],
                                 2 * four.parameters)


def test_mfu_follows_the_stated_formula(a100) -> None:
    result = simulate_training(a100, "gpt2", batch=2, seq_len=256, model_set=GPT2[1])
    n, layers, hidden = result.parameters, 2, 768
    assert result.model_flops == 2 * (6 * n * 256 + 12 * layers * hidden * 256 ** 2)
    assert result.model_flops == model_flops(n, layers, hidden, 256, 2)
    peak = 108 * 2048 * 1.41e9  # the A100 file: 108 SMs × 2,048 bf16 FLOP/cycle, 1.41 GHz
    assert result.mfu == pytest.approx(result.model_flops / result.step_time_s / peak,
                                       rel=1e-9)
    assert result.tokens == 512
    assert result.tokens_per_s == pytest.approx(512 / result.step_time_s)


def test_the_cli_prints_a_step_and_writes_the_memory_plot(tmp_path: Path, capsys) -> None:
    plot = tmp_path / "plots"
    code = main(["--hw", "gpu_a100.yaml", "--model", "gpt2", "--model-set", "n_layer=2",
                 "--phase", "train", "--batch", "2", "--seq-len", "128", "--format", "json",
                 "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    for key in ("step_time_s", "tokens_per_s", "model_tflops_per_gpu", "mfu",
                "peak_memory_bytes"):
        assert data[key] > 0, key
    assert data["devices"][0]["peak_memory_bytes"] == data["peak_memory_bytes"]
    assert (plot / "memory_timeline.png").stat().st_size > 10_000
    rows = (plot / "memory_timeline.csv").read_text().splitlines()
    assert rows[0].startswith("time_s,weights_bytes") and len(rows) > 50
    assert max(int(row.rsplit(",", 1)[1]) for row in rows[1:]) == data["peak_memory_bytes"]


def test_out_of_memory_names_the_device_and_what_dominates(capsys) -> None:
    code = main(["--hw", "gpu_a100_40gb.yaml", "--model", "llama2-7b", "--model-set",
                 "num_hidden_layers=16", "--phase", "train", "--batch", "1", "--seq-len", "64"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "runs out of memory" in err and "optimizer hold the most" in err


@pytest.mark.parametrize(("args", "fragment"), [
    (["--zero", "2"], "--zero"),
    (["--offload", "optimizer"], "--offload"),
    (["--tp", "2"], "--tp"),
    (["--context", "10"], "--context"),
    (["--micro-batch", "3"], "--micro-batch"),
    (["--quant", "w8a8"], "--quant"),
])
def test_training_refuses_what_it_does_not_model(capsys, args: list[str], fragment: str) -> None:
    refused(capsys, ["--hw", "gpu_a100.yaml", "--model", "gpt2", "--phase", "train",
                     "--batch", "4", "--seq-len", "64", *args], fragment)


@pytest.mark.parametrize(("model", "fragment"), [
    ("1.3b", "MatMul-free"), ("mixtral-8x7b", "MoE"), ("vit-b-16", "causal")])
def test_models_without_a_training_step_are_refused(capsys, model: str, fragment: str) -> None:
    refused(capsys, ["--hw", "gpu_a100.yaml", "--model", model, "--phase", "train"], fragment)


def test_training_flags_need_the_train_phase(capsys) -> None:
    refused(capsys, ["--hw", "gpu_a100.yaml", "--model", "gpt2", "--recompute", "full"],
            "--recompute", "--phase train")


def test_executed_flops_count_every_pass(traces) -> None:
    trace = traces[("gpt2", "none")].trace
    forward = sum(op.ops for op in trace.ops if op.stage == "fwd" and op.kind in MATRIX_KINDS)
    attention = sum(op.ops for op in trace.ops if op.stage == "fwd" and op.kind == "attention")
    backward = sum(op.ops for op in trace.ops if op.stage.startswith("bwd")
                   and op.kind in MATRIX_KINDS)
    assert backward == 2 * (forward - attention) + 2.5 * attention


@pytest.fixture(scope="module")
def zero_runs() -> dict[int, object]:
    kwargs = {"batch": 4, "seq_len": 128, "dp": 4, "model_set": LLAMA[1]}
    return {zero: simulate_training("dgx_a100.yaml", "llama2-7b", zero=zero, **kwargs)
            for zero in (0, 1, 2, 3)}


def test_zero_partitions_what_its_stage_says(zero_runs) -> None:
    single = simulate_training("gpu_a100.yaml", "llama2-7b", batch=1, seq_len=128,
                               model_set=LLAMA[1])
    weights = single.devices[0].at_peak_bytes["weights"]
    optimizer = single.devices[0].at_peak_bytes["optimizer"]
    held = {zero: run.devices[0].at_peak_bytes for zero, run in zero_runs.items()}
    assert held[0]["weights"] == held[1]["weights"] == held[2]["weights"] == weights
    assert held[3]["weights"] == math.ceil(weights / 4)  # ZeRO-3: parameters = total / dp
    assert held[0]["optimizer"] == optimizer
    for zero in (1, 2, 3):
        assert held[zero]["optimizer"] == math.ceil(optimizer / 4)
    peaks = [zero_runs[zero].peak_memory_bytes for zero in (0, 1, 2, 3)]
    # (ZeRO-2 may hold more than ZeRO-1 here: its 10⁹-byte bucket is the whole model's
    # gradients, kept until reduced, on top of its partition)
    assert max(peaks[1:]) < peaks[0] / 2 and peaks[3] < peaks[2]
    assert len(zero_runs[3].devices) == 4


def test_data_parallel_steps_talk_on_the_links(zero_runs) -> None:
    single = simulate_training("gpu_a100.yaml", "llama2-7b", batch=1, seq_len=128,
                               model_set=LLAMA[1])
    for zero, run in zero_runs.items():
        assert run.stage_time_s["communication"] > 0, zero
        assert run.step_time_s > single.step_time_s - single.stage_time_s["optim"], zero
        assert run.tokens == 4 * 128
    # every ZeRO stage moves at least an all-reduce's worth; ZeRO-3 adds the gathers
    assert (zero_runs[3].stage_time_s["communication"]
            > zero_runs[0].stage_time_s["communication"])
    # ZeRO 1-3 update a quarter of the weights each
    assert zero_runs[1].stage_time_s["optim"] < single.stage_time_s["optim"] / 2


def test_zero_needs_replicas(capsys) -> None:
    refused(capsys, ["--hw", "dgx_a100.yaml", "--model", "gpt2", "--phase", "train",
                     "--zero", "2"], "--zero", "--dp")
    refused(capsys, ["--hw", "gpu_a100.yaml", "--model", "gpt2", "--phase", "train",
                     "--batch", "2", "--dp", "2"], "--dp", "one chip")


@pytest.mark.parametrize("spec", ["rank=8,modules=q,v", "rank=8,modules=q,v,shared_down=true"])
def test_a_frozen_base_has_no_weight_gradients_or_optimizer_state(traces, spec: str) -> None:
    lora = parse_lora(spec)
    training = capture_training(_cfg(LLAMA), 2, 64, lora=lora)
    ops_ = training.trace.ops
    base = {op.module for op in traces[("llama2-7b", "none")].trace.ops
            if op.stage == "fwd" and op.kind == "matmul" and op.weight_bytes}
    adapted = {m for m in base if m.endswith(("q_proj", "v_proj"))}
    # the only weight-gradient GEMMs are the adapters' (a rank-8 output or input)
    for op in ops_:
        if op.stage == "bwd_weight" and op.kind == "matmul":
            assert op.module in adapted and 8 in (op.dims["m"], op.dims["n"]), op.shapes
    updates = [op for op in ops_ if op.stage == "optim"]
    down = 4096 // (4 if lora.shared_down else 1)
    per_linear = 8 * 4096 + (0 if lora.shared_down else 8 * down)
    shared = 8 * down if lora.shared_down else 0
    assert sum(op.dims["numel"] for op in updates) == training.trainable
    assert training.trainable == len(adapted) * per_linear + shared
    assert training.state_bytes == 8 * training.trainable
    assert training.params > 100 * training.trainable
    grads = sum(b.bytes for b in training.buffers if b.category == "gradients")
    assert grads == 2 * training.trainable


def test_lora_flag_errors_are_one_line(capsys) -> None:
    base = ["--hw", "gpu_a100.yaml", "--model", "gpt2", "--phase", "train", "--lora"]
    refused(capsys, [*base, "rank=0,modules=q"], "--lora")
    refused(capsys, [*base, "rank=4,modules=nothing"], "--lora", "no linear")
    refused(capsys, [*base, "rank=4,modules=c_attn,alpha=3"], "--lora", "alpha")
