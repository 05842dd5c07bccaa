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
from simulator.training.chunked import fpdt_chunks
from simulator.training.flops import model_flops
from simulator.training.offload import offload_checkpoints
from simulator.training.pipeline import (
    StageTimes,
    interleaved,
    one_f_one_b,
    run_one_f_one_b,
    split_stages,
)
from simulator.training.sequence_parallel import split_sequence_training
from simulator.training.tensor_parallel import split_training
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
    (["--tp-sp"], "--tp-sp"),
    (["--pp-interleave", "2"], "--pp-interleave"),
    (["--context", "10"], "--context"),
    (["--micro-batch", "3"], "--micro-batch"),
    (["--quant", "w8a8"], "--quant"),
])
def test_training_refuses_what_it_does_not_model(capsys, args: list[str], fragment: str) -> None:
    refused(capsys, ["--hw", "gpu_a100.yaml", "--model", "gpt2", "--phase", "train",
                     "--batch", "4", "--seq-len", "64", *args], fragment)


@pytest.mark.parametrize(("model", "fragment"), [
    ("1.3b", "MatMul-free"), ("mixtral-8x7b", "MoE")])
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


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
def test_tensor_parallelism_splits_the_matrix_work_exactly(traces, name: str) -> None:
    """Per device: 1/tp of every GEMM (the vocabulary padded to a multiple of tp), the
    heads, and the split linears' parameters, gradients and optimizer state; per block two
    all-reduces forward (after the row splits) and two backward (the column splits' input
    gradients, q/k/v summed before theirs)."""
    whole = traces[(name, "none")]
    tp = 4
    split = split_training(whole, tp)
    for stage in ("fwd", "bwd_act", "bwd_weight"):
        ours = _weight_matmuls(split.trace.ops, stage)
        for module, flops in _weight_matmuls(whole.trace.ops, stage).items():
            if module == "lm_head":
                assert ours[module] * tp >= flops
            else:
                assert ours[module] * tp == flops, (stage, module)
    heads = [op.dims["heads"] for op in split.trace.ops if op.kind == "attention"]
    assert heads and all(h * tp == 12 if name == "gpt2" else h * tp == 32 for h in heads)
    reduces = Counter((op.stage, op.layer) for op in split.trace.ops
                      if op.kind == "collective" and op.fn == "allreduce")
    blocks = [layer for layer in dict.fromkeys(op.layer for op in whole.trace.ops)
              if layer.rpartition(".")[2].isdigit()]
    for layer in blocks:
        assert reduces[("fwd", layer)] == 2 and reduces[("bwd_act", layer)] == 2, layer
    pairs = zip((op for op in whole.trace.ops if op.stage == "optim"),
                (op for op in split.trace.ops if op.stage == "optim"), strict=True)
    replicated = sum(ours.dims["numel"] for op, ours in pairs
                     if ours.dims["numel"] == op.dims["numel"])
    assert replicated < whole.trainable / 20  # norms, biases of row splits, positions
    assert split.trainable == pytest.approx(replicated + (whole.trainable - replicated) / tp,
                                            rel=1e-3)
    assert split.master_bytes == pytest.approx(whole.master_bytes * split.trainable
                                               / whole.trainable, abs=1)


def test_tensor_parallel_steps_divide_memory_and_add_collectives() -> None:
    kwargs = {"batch": 2, "seq_len": 128, "model_set": LLAMA[1]}
    single = simulate_training("gpu_a100.yaml", "llama2-7b", **kwargs)
    split = simulate_training("dgx_a100.yaml", "llama2-7b", tp=4, **kwargs)
    assert split.tp == 4 and split.devices_count == len(split.devices) == 4
    assert split.stage_time_s["communication"] > 0 == single.stage_time_s["communication"]
    held, one = split.devices[0].at_peak_bytes, single.devices[0].at_peak_bytes
    assert one["weights"] / 4 < held["weights"] < one["weights"] / 3.9
    assert split.peak_memory_bytes < single.peak_memory_bytes / 2
    assert split.model_flops == single.model_flops


def test_tensor_parallelism_refuses_what_does_not_split(capsys) -> None:
    base = ["--model", "gpt2", "--phase", "train", "--seq-len", "64", "--model-set", "n_layer=1"]
    refused(capsys, ["--hw", "gpu_a100.yaml", "--tp", "2", *base], "--tp", "one chip")
    refused(capsys, ["--hw", "dgx_a100.yaml", "--tp", "8", *base], "--tp", "12 heads")
    refused(capsys, ["--hw", "dgx_a100.yaml", "--tp", "2", "--lora", "rank=4,modules=c_attn",
                     *base], "--tp", "LoRA")
    refused(capsys, ["--hw", "dgx_a100.yaml", "--tp", "4", "--dp", "4", "--batch", "4", *base],
            "--tp", "16 devices")


@pytest.mark.parametrize(("pp", "micro_batches"), [(4, 8), (8, 4), (2, 1)])
def test_one_f_one_b_runs_every_pass_once_with_the_textbook_bubble(pp: int,
                                                                   micro_batches: int) -> None:
    """Uniform stages (forward 1, backward 2), hand-overs free: the step takes
    (M + pp − 1)·(F + B) and the bubble is (pp − 1)/(M + pp − 1) (Narayanan et al. §2.2)."""
    for stage in range(pp):
        order = one_f_one_b(stage, pp, micro_batches)
        assert sorted(order) == sorted([(k, m) for k in "FB" for m in range(micro_batches)])
        assert order.index(("B", 0)) == min(pp - stage - 1, micro_batches - 1) + 1
    run = run_one_f_one_b(None, [StageTimes(1.0, 2.0, 2.0, 0.0)] * pp, [0] * pp,
                          micro_batches, 1)
    assert run.makespan_ns == pytest.approx((micro_batches + pp - 1) * 3.0)
    assert run.bubble_fraction == pytest.approx((pp - 1) / (micro_batches + pp - 1))


@pytest.mark.parametrize(("pp", "chunks", "micro_batches"),
                         [(4, 2, 8), (8, 3, 64), (4, 3, 4), (2, 2, 6)])
def test_interleaving_shrinks_the_bubble_by_the_chunks(pp: int, chunks: int,
                                                       micro_batches: int) -> None:
    """Uniform virtual stages (forward 1, backward 2), hand-overs free: the interleaved
    schedule takes (M·v + pp − 1)·(F + B), its bubble (pp − 1)/v of the plain one's
    (Narayanan et al. 2021, §2.2.2)."""
    for device in range(pp):
        order = interleaved(device, pp, chunks, micro_batches)
        assert sorted(order) == sorted([(k, c * pp + device, m) for k in "FB"
                                        for c in range(chunks) for m in range(micro_batches)])
        forwards = [task for task in order if task[0] == "F"]
        assert forwards[0] == ("F", device, 0) and order[-1] == ("B", device, micro_batches - 1)
    run = run_one_f_one_b(None, [StageTimes(1.0, 2.0, 2.0, 0.0)] * (pp * chunks),
                          [0] * (pp * chunks), micro_batches, 1, chunks)
    assert run.makespan_ns == pytest.approx((micro_batches * chunks + pp - 1) * 3.0)
    assert len(run.busy_ns) == pp


def test_an_interleaved_step_has_a_smaller_bubble_and_is_refused_where_not_modelled(
        capsys) -> None:
    base = ["--hw", "dgx_a100.yaml", "--model", "gpt2", "--phase", "train", "--seq-len", "512",
            "--pp", "2", "--micro-batch", "1", "--batch", "4", "--format", "json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--pp-interleave", "3"]) == 0
    inter = json.loads(capsys.readouterr().out)
    assert plain["pp_interleave"] == 1 and inter["pp_interleave"] == 3
    assert inter["model_flops"] == plain["model_flops"]
    assert inter["bubble_fraction"] < plain["bubble_fraction"]
    assert inter["step_time_s"] < plain["step_time_s"]
    refused(capsys, [*base[:-2], "--batch", "3", "--pp-interleave", "2"], "--pp-interleave",
            "multiple of 2")
    refused(capsys, [*base[:-2], "--pp-interleave", "5"], "--pp-interleave")  # 10 stages, 12 blocks


def test_pipeline_stages_hold_every_op_and_parameter_once(traces) -> None:
    whole = traces[("llama2-7b", "none")]
    stages, handed = split_stages(whole, 2)
    assert sum(len(stage.trace.ops) for stage in stages) == len(whole.trace.ops)
    assert sum(stage.param_bytes for stage in stages) == whole.param_bytes  # untied head
    assert sum(stage.trainable for stage in stages) == whole.trainable
    assert {op.layer for op in stages[0].trace.ops} == {"embed", "layers.0"}
    assert {"norm", "lm_head", "layers.1"} <= {op.layer for op in stages[1].trace.ops}
    assert handed[0] == 2 * 64 * 4096 * 2  # the block's output: micro-batch 2 × 64 tokens
    tied, _ = split_stages(traces[("gpt2", "none")], 2)
    assert tied[1].param_bytes > sum(op.dims["weight_bytes"] for op in tied[1].trace.ops
                                     if op.stage == "optim")  # its copy of the embedding


def test_a_pipelined_step_stashes_the_micro_batches_in_flight() -> None:
    kwargs = {"batch": 8, "micro_batch": 1, "seq_len": 128, "model_set": {
        "num_hidden_layers": "4"}}
    flat = simulate_training("dgx_a100.yaml", "llama2-7b", **kwargs)
    piped = simulate_training("dgx_a100.yaml", "llama2-7b", pp=4, **kwargs)
    assert piped.pp == 4 and len(piped.devices) == 4 and piped.model_flops == flat.model_flops
    assert 0.2 < piped.bubble_fraction < 3 / 11 + 0.1
    first, last = piped.devices[0].at_peak_bytes, piped.devices[-1].at_peak_bytes
    assert first["weights"] < flat.devices[0].at_peak_bytes["weights"] / 3
    assert first["activations"] > 3 * last["activations"] / 2  # 4 micro-batches in flight, 1
    assert piped.stage_time_s["communication"] == 0  # hand-overs overlap; no collectives


def test_pipelining_refuses_what_it_does_not_model(capsys) -> None:
    base = ["--hw", "dgx_a100.yaml", "--model", "gpt2", "--phase", "train", "--seq-len", "64",
            "--model-set", "n_layer=4"]
    refused(capsys, [*base, "--pp", "3"], "--pp", "divisor of 4")
    refused(capsys, [*base, "--pp", "2", "--dp", "2", "--batch", "2", "--zero", "2"],
            "--zero", "--pp 2")
    refused(capsys, [*base, "--pp", "2", "--lora", "rank=4,modules=c_attn"], "--pp", "LoRA")
    refused(capsys, [*base, "--pp", "16"], "--pp", "16 devices")


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
def test_ulysses_splits_the_tokens_and_turns_attention_into_heads(traces, name: str) -> None:
    """Per device: 1/sp of every GEMM (weight gradients sum over its tokens into whole
    gradients), attention over all tokens for heads/sp, two all-to-alls around each
    attention forward and two around its backward; the weights stay whole."""
    whole = traces[(name, "none")]
    sp = 4
    split = split_sequence_training(whole, sp)
    for stage in ("fwd", "bwd_act", "bwd_weight"):
        ours = _weight_matmuls(split.trace.ops, stage)
        for module, flops in _weight_matmuls(whole.trace.ops, stage).items():
            assert ours[module] * sp == flops, (stage, module)
    grads = [b.bytes for b in whole.buffers if b.category == "gradients"]
    assert [b.bytes for b in split.buffers if b.category == "gradients"] == grads
    assert split.param_bytes == whole.param_bytes
    swaps = Counter((op.stage, op.module.rpartition(".")[2]) for op in split.trace.ops
                    if op.fn == "alltoall")
    attentions = sum(op.kind == "attention" and op.stage == "fwd" for op in whole.trace.ops)
    assert swaps == {("fwd", "ulysses_qkv"): attentions, ("fwd", "ulysses_out"): attentions,
                     ("bwd_act", "ulysses_dout"): attentions,
                     ("bwd_act", "ulysses_dqkv"): attentions}
    full = [op for op in split.trace.ops if op.kind == "attention"]
    assert all(op.dims["q_len"] == 64 and op.dims["heads"] * sp in (12, 32) for op in full)


def test_ulysses_partitions_zero_over_its_devices(capsys) -> None:
    kwargs = {"batch": 1, "seq_len": 256, "model_set": LLAMA[1]}
    single = simulate_training("gpu_a100.yaml", "llama2-7b", **kwargs)
    ulysses = simulate_training("dgx_a100.yaml", "llama2-7b", sp=4, zero=3, **kwargs)
    assert ulysses.sp == 4 and len(ulysses.devices) == 4
    held, one = ulysses.devices[0].at_peak_bytes, single.devices[0].at_peak_bytes
    assert held["weights"] == math.ceil(one["weights"] / 4)
    assert held["optimizer"] == math.ceil(one["optimizer"] / 4)
    assert ulysses.model_flops == single.model_flops
    refused(capsys, ["--hw", "dgx_a100.yaml", "--model", "gpt2", "--phase", "train",
                     "--seq-len", "64", "--sp", "8"], "--sp", "12 heads")
    refused(capsys, ["--hw", "dgx_a100.yaml", "--model", "gpt2", "--phase", "train",
                     "--seq-len", "64", "--sp", "2", "--tp", "2"], "--sp", "not modelled")


def test_the_longest_sequence_is_where_the_memory_model_runs_out() -> None:
    """max_seq_len doubles the sequence from the case's prompt: the answer fits every GPU
    and twice it does not (FPDT's TP row, the only probes 16K, 32K and 64K)."""
    from simulator.validation.cases import load_cases, run_cases, shipped_case_files

    path = next(p for p in shipped_case_files() if p.name == "fpdt_memory.yaml")
    case = next(c for c in load_cases(path) if c.id == "fpdt-llama3-8b-tp")
    longest = int(run_cases([case])[0].simulated)
    assert longest >= case.prompt
    for seq_len, fits in ((longest, True), (2 * longest, False)):
        step = simulate_training("dgx_a100.yaml", "llama3-8b", batch=1, seq_len=seq_len, tp=8,
                                 model_set={"max_position_embeddings": str(seq_len)})
        assert (step.out_of_memory is None) is fits


def test_unfused_attention_keeps_its_softmax_for_the_backward() -> None:
    """Without a fused kernel each block's forward also keeps P, the softmax of its scores
    (batch · heads · s² elements in bf16), and writes S as workspace."""
    kwargs = {"batch": 2, "seq_len": 512, "model_set": {"n_layer": "2"}}
    fused = simulate_training("gpu_a100.yaml", "gpt2", **kwargs)
    unfused = simulate_training("gpu_a100.yaml", "gpt2", hw_set={
        "scheduling.fused_attention": False}, **kwargs)
    scores = 2 * 12 * 512 * 512 * 2
    for layer, saved in fused.saved_activation_bytes.items():
        extra = scores if layer.rpartition(".")[2].isdigit() else 0
        assert unfused.saved_activation_bytes[layer] == saved + extra, layer
    assert unfused.peak_memory_bytes >= fused.peak_memory_bytes + 2 * scores


def test_offloaded_checkpoints_leave_the_device_and_come_back(traces) -> None:
    """Each checkpoint (a forward tensor the recompute reads) is copied out once and
    prefetched once, before the recompute that reads it; the rest of the trace is as it
    was."""
    whole = traces[("llama2-7b", "full")]
    moved = offload_checkpoints(whole)
    copies = [op for op in moved.trace.ops if op.fn in ("d2h", "h2d")]
    out = sum(op.input_bytes for op in copies if op.fn == "d2h")
    back = sum(op.input_bytes for op in copies if op.fn == "h2d")
    assert out == back > 0
    kept = [(op.module, op.fn, op.ops, op.stage) for op in moved.trace.ops
            if op.fn not in ("d2h", "h2d")]
    assert kept == [(op.module, op.fn, op.ops, op.stage) for op in whole.trace.ops]
    for op in moved.trace.ops:
        if op.fn == "h2d":
            reader = next(o for o in moved.trace.ops if op.index in o.deps)
            assert reader.stage == "recompute" and reader.index > op.index


def test_offloading_checkpoints_lowers_the_peak_over_the_host_link(capsys) -> None:
    kwargs = {"batch": 1, "seq_len": 4096, "recompute": "full",
              "model_set": {"num_hidden_layers": "8"}}
    kept = simulate_training("gpu_a100.yaml", "llama2-7b", **kwargs)
    sent = simulate_training("gpu_a100.yaml", "llama2-7b", offload="activations", **kwargs)
    assert sent.stage_time_s["offload"] > 0 == kept.stage_time_s["offload"]
    assert sent.step_time_s >= kept.step_time_s
    assert sum(sent.saved_activation_bytes.values()) < sum(kept.saved_activation_bytes.values())
    base = ["--hw", "gpu_a100.yaml", "--model", "gpt2", "--phase", "train", "--seq-len", "64"]
    refused(capsys, [*base, "--offload", "activations"], "--offload", "--recompute full")
    refused(capsys, [*base, "--offload", "optimizer", "--recompute", "full"], "--offload",
            "not modelled")
    refused(capsys, [*base, "--offload", "weights", "--recompute", "full"], "--offload",
            "activations, optimizer")


def _matrix_flops(training: TrainingTrace, stage: str) -> dict[str, int]:
    flops: dict[str, int] = defaultdict(int)
    for op in training.trace.ops:
        if op.stage == stage and op.kind in MATRIX_KINDS:
            flops[op.module] += op.ops
    return dict(flops)


@pytest.mark.parametrize(("name", "inputs", "norm"), [
    ("llama2-7b", (".mlp.gate_proj", ".mlp.up_proj"), ".attn_norm"),
    ("gpt2", (".mlp.c_fc",), ".ln_1")])
def test_fpdt_chunks_recompute_the_feed_forward_and_logits_and_stream_attention(
        traces, name: str, inputs: tuple[str, ...], norm: str) -> None:
    """FPDT's chunks keep every forward and backward op and add exactly one more recompute of
    each feed-forward's input GEMMs and of the logits; every layer's saved attention tensors
    go to the host once in the recompute and stream back in the backward, (u + 1) / 2 times
    the q-side tensors."""
    whole = split_sequence_training(traces[(name, "full")], 2)
    u = 4
    cut = fpdt_chunks(whole, u)
    for stage in ("fwd", "bwd_act", "bwd_weight", "optim"):
        assert _matrix_flops(cut, stage) == _matrix_flops(whole, stage)
    before, after = _matrix_flops(whole, "recompute"), _matrix_flops(cut, "recompute")
    for module, flops in after.items():
        again = 2 if module.endswith(inputs) else 1
        assert flops == again * before.get(module, 0) or module == "lm_head"
    head = next(op for op in whole.trace.ops if op.module == "lm_head" and op.stage == "fwd")
    assert after["lm_head"] == head.ops
    layers = {op.layer for op in whole.trace.ops if op.kind == "attention"}
    copies = [op for op in cut.trace.ops if op.fn in ("d2h", "h2d")]
    assert Counter(op.module.rsplit(".", 1)[1] for op in copies) == {
        "fpdt_offload": len(layers), "fpdt_prefetch": len(layers),
        "fpdt_stream": len(layers), "fpdt_dq": len(layers)}
    attention = next(op for op in whole.trace.ops
                     if op.kind == "attention" and op.stage == "recompute")
    d = attention.dims
    q = attention.input_bytes * d["heads"] // (d["heads"] + 2 * d["kv_heads"])
    sent = next(op for op in copies if op.module.endswith("fpdt_offload")
                and op.layer == attention.layer)
    assert sent.input_bytes > attention.input_bytes + attention.output_bytes
    normed = next(op for op in whole.trace.ops if op.stage == "recompute"
                  and op.module == attention.layer + norm)
    lse = d.get("batch", 1) * d["q_len"] * d["heads"] * 4
    assert sent.input_bytes == (attention.input_bytes + attention.output_bytes
                                + normed.output_bytes + lse)
    fetched = sum(op.input_bytes for op in copies if op.layer == attention.layer
                  and op.module.endswith(("fpdt_prefetch", "fpdt_stream")))
    assert fetched >= (2 * q + 2 * attention.output_bytes) * (u + 1) / 2
    assert fpdt_chunks(whole, 1) is whole


def test_fpdt_chunks_lower_the_peak_and_are_refused_where_not_modelled(capsys) -> None:
    kwargs = {"batch": 1, "seq_len": 32768, "recompute": "full", "sp": 2,
              "model_set": {"num_hidden_layers": "2", "max_position_embeddings": "32768"}}
    plain = simulate_training("dgx_a100.yaml", "llama2-7b", **kwargs)
    peaks = [simulate_training("dgx_a100.yaml", "llama2-7b", chunk=c, **kwargs)
             for c in (16384, 4096)]
    assert plain.peak_memory_bytes > peaks[0].peak_memory_bytes > peaks[1].peak_memory_bytes
    assert [r.fpdt_chunks for r in (plain, *peaks)] == [1, 2, 8]
    assert peaks[1].stage_time_s["offload"] > 0 == plain.stage_time_s["offload"]
    assert peaks[1].stage_time_s["recompute"] > plain.stage_time_s["recompute"]
    base = ["--hw", "dgx_a100.yaml", "--model", "gpt2", "--phase", "train", "--seq-len", "64"]
    refused(capsys, [*base, "--chunk", "16"], "--chunk", "--recompute full")
    refused(capsys, [*base, "--chunk", "24", "--recompute", "full"], "--chunk", "divisor")
    refused(capsys, [*base, "--chunk", "many", "--recompute", "full"], "--chunk", "whole")
    refused(capsys, [*base, "--chunk", "16", "--recompute", "full", "--tp", "2"], "--chunk",
            "--sp")


CONFIGS = Path(__file__).resolve().parents[1] / "workloads" / "configs"


@pytest.fixture(scope="module")
def clip_cfg(tmp_path_factory):
    """CLIP ViT-B/16 at two blocks a tower (its widths, heads and lengths unchanged)."""
    config = json.loads((CONFIGS / "clip-vit-b-16.json").read_text())
    for tower in ("text_config", "vision_config"):
        config[tower]["num_hidden_layers"] = 2
    path = tmp_path_factory.mktemp("clip") / "config.json"
    path.write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    return resolve_model(str(path), None, None)


def test_clip_trains_on_images_and_every_class_prompt(clip_cfg) -> None:
    """Few-shot CLIP: the vision tower sees the batch's images (197 tokens each), the text
    tower every class prompt (77 tokens each); backward = 2 × forward for every linear of
    both towers, and the model FLOPs are the traced forward and backward matrix FLOPs."""
    training = capture_training(clip_cfg, 3, 197, classes=5)
    ops_ = training.trace.ops
    linears = {op.module: op for op in ops_
               if op.stage == "fwd" and op.kind == "matmul" and op.weight_bytes}
    rows = {m.partition(".")[0]: op.dims["m"] for m, op in linears.items()
            if m.endswith("layers.0.self_attn.q_proj")}
    assert rows == {"vision_model": 3 * 197, "text_model": 5 * 77}
    act, weight = _weight_matmuls(ops_, "bwd_act"), _weight_matmuls(ops_, "bwd_weight")
    for module, op in linears.items():
        assert weight.get(module) == op.ops, module
        if module != "vision_model.embeddings.patch_embedding":  # no gradient to pixels
            assert act.get(module) == op.ops, module
    assert training.encoder and training.trainable == training.params
    flops = simulate_training(load_hardware("gpu_rtx3090.yaml"), clip_cfg, batch=6,
                              micro_batch=3, classes=5, use_cache=False)
    traced = sum(op.ops for op in ops_ if op.kind in MATRIX_KINDS and op.stage != "optim")
    assert flops.model_flops == 2 * traced and flops.seq_len == 197
    assert flops.tokens == 6 * 197 and "traced" in flops.flops_formula


def test_a_frozen_clip_has_adapter_gradients_only_and_a_lower_peak(clip_cfg) -> None:
    hw = load_hardware("gpu_rtx3090.yaml")
    full = simulate_training(hw, clip_cfg, batch=4, classes=8, use_cache=False)
    adapted = simulate_training(hw, clip_cfg, batch=4, classes=8, lora="rank=2,modules=q,k,v",
                                use_cache=False)
    block = simulate_training(hw, clip_cfg, batch=4, classes=8, use_cache=False,
                              lora="rank=2,modules=q,k,v,shared_down=true")
    # rank 2 on q, k, v of 2 blocks a tower: text 512 wide, vision 768 (Block-LoRA: A cut in 4)
    assert adapted.trainable_parameters == 2 * 3 * (2 * 2 * 512 + 2 * 2 * 768)
    assert block.trainable_parameters == 2 * 3 * (2 * 512 + 2 * 768) + 2 * (512 + 768) // 4
    training = capture_training(clip_cfg, 4, 197, classes=8,
                                lora=parse_lora("rank=2,modules=q,k,v"))
    for op in training.trace.ops:
        if op.stage == "bwd_weight" and op.kind == "matmul":
            assert op.module.endswith(("q_proj", "k_proj", "v_proj")), op.module
            assert 2 in (op.dims["m"], op.dims["n"]), op.shapes
    for lora in (adapted, block):  # no inputs of frozen GEMMs kept, no AdamW state for them
        assert lora.peak_memory_bytes < full.peak_memory_bytes
        # AdamW's fp32 master copy and two moments: of the adapters only
        assert lora.devices[0].at_peak_bytes["optimizer"] == 12 * lora.trainable_parameters


@pytest.mark.parametrize(("args", "fragment"), [
    (["--tp", "2"], "--tp"), (["--prompt", "100"], "--prompt"),
    (["--recompute", "full", "--offload", "activations"], "--offload")])
def test_an_encoder_step_refuses_what_it_does_not_model(capsys, args: list[str],
                                                        fragment: str) -> None:
    refused(capsys, ["--hw", "dgx_a100.yaml", "--model", "clip-vit-b-16", "--phase", "train",
                     "--batch", "2", *args], fragment)


def test_classes_are_clip_prompts_only(capsys) -> None:
    refused(capsys, ["--hw", "gpu_a100.yaml", "--model", "gpt2", "--phase", "train",
                     "--classes", "10"], "--classes", "text tower")
    refused(capsys, ["--hw", "gpu_a100.yaml", "--model", "vit-b-16", "--phase", "train",
                     "--classes", "10"], "--classes")
    refused(capsys, ["--hw", "gpu_a100.yaml", "--model", "clip-vit-b-16", "--phase", "train",
                     "--classes", "0"], "--classes")
    refused(capsys, ["--hw", "gpu_a100.yaml", "--model", "clip-vit-b-16", "--classes", "10"],
            "--classes", "--phase train")


def test_a_vision_classifier_trains_on_its_class_logits() -> None:
    result = simulate_training(load_hardware("gpu_a100.yaml"), "vit-b-16", batch=2,
                               model_set={"num_hidden_layers": "1"}, use_cache=False)
    assert result.seq_len == 197 and result.trainable_parameters == result.parameters
    assert 0 < result.mfu <= result.hfu
