"""Structured compression as configs (issue "Any model a user already has", item 4): per-layer
widths (MoDeGPT-style fewer heads and narrower MLPs) and removed blocks (FuseGPT-style), each
block built, counted and simulated at its own shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import refused

from simulator.api import simulate
from simulator.cli import main
from simulator.hardware import load_hardware
from simulator.report import Result
from simulator.workload.cache import get_trace
from simulator.workload.trace import Trace
from workloads.config import ModelConfig, resolve_model

A100 = "gpu_a100.yaml"
DENSE = resolve_model("llama2-7b")
#: MoDeGPT-style 70 %: every module at 70 % of its width, heads whole (head_dim kept at 128).
KEEP = 0.7
FFN, HEADS = round(KEEP * 11008), round(KEEP * 32)
#: A heterogeneous 4-layer Llama-2-7B: one dense layer, then narrower ones (GQA in the last two).
MIXED = {"intermediate_size": [11008, 7706, 5504, 2048], "num_attention_heads": [32, 22, 16, 8],
         "num_key_value_heads": [32, 22, 8, 8]}


def _sets(fields: dict[str, Any]) -> dict[str, str]:
    """--model-set strings (YAML) of typed values."""
    return {key: json.dumps(value) for key, value in fields.items()}


def _compressed(layers: int = 32, **extra: Any) -> ModelConfig:
    fields = {"intermediate_size": [FFN] * layers, "num_attention_heads": [HEADS] * layers,
              "num_key_value_heads": [HEADS] * layers, "head_dim": 128}
    return resolve_model("llama2-7b", _sets({"num_hidden_layers": layers, **fields, **extra}))


def _mixed(**extra: Any) -> ModelConfig:
    return resolve_model("llama2-7b", _sets({"num_hidden_layers": 4, "head_dim": 128, **MIXED,
                                             **extra}))


def _flops(ops: Any) -> int:
    """Matmul and attention operations (2 per multiply-add), the FLOPs of a step."""
    return sum(op.ops for op in ops if op.kind in {"matmul", "attention"})


# --- the 70 % model against the dense one --------------------------------------------------

@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, str, str], Result]:
    """Dense and 70 % Llama-2-7B, decode at context 2048 and prefill of 2048, on the A100,
    eager (its default) and under CUDA graphs."""
    small = _compressed()
    return {(name, phase, runtime): simulate(A100, cfg, phase=phase, context=2048,
                                             prompt=2048, runtime=runtime)
            for name, cfg in (("dense", DENSE), ("small", small))
            for phase in ("decode", "prefill") for runtime in ("eager", "cuda_graphs")}


def test_the_70_percent_model_is_the_closed_form() -> None:
    small = _compressed()
    assert (FFN, HEADS) == (7706, 22)
    assert small.layer(5) == (22, 22, 7706) and small.head_dim == 128
    d, q = 4096, 22 * 128
    assert small.layer_params(0) == 4 * d * q + 3 * d * 7706 + 2 * d
    assert small.param_count == 2 * 32000 * d + d + 32 * small.layer_params(0)
    assert 0.70 < small.param_count / DENSE.param_count < 0.72  # embeddings stay whole


@pytest.mark.parametrize("runtime", ["eager", "cuda_graphs"])
def test_decode_is_as_much_faster_as_it_moves_fewer_bytes(
        runs: dict[tuple[str, str, str], Result], runtime: str) -> None:
    """Decode streams the weights and KV cache: the time ratio is at least the DRAM-bytes
    ratio r and at most what it would be if the dense step's time outside kernels that move
    DRAM bytes (launches, kernels on on-chip data: share 1 − u) did not shrink at all. (A
    kernel's streaming time is its bytes over a rate, the channel's or what its cores keep
    in flight over the latency, so it shrinks with its bytes either way.)"""
    dense, small = runs["dense", "decode", runtime], runs["small", "decode", runtime]
    weights = small.weights_bytes / dense.weights_bytes
    r = small.dram_bytes / dense.dram_bytes
    assert abs(r - weights) < 0.02  # the weights are nearly all of the traffic
    u = sum(op.end_s - op.start_s for op in dense.ops if op.dram_bytes > 0) / dense.latency_s
    ratio = small.latency_s / dense.latency_s
    # + 0.05: the narrower GEMVs of the compressed model fill the last wave of SMs less well
    # and keep fewer bytes in flight, so their streaming runs a little below the dense rate
    assert r <= ratio <= r + (1 - r) * (1 - u) + 0.05, (ratio, r, u)
    assert small.tokens_per_s / dense.tokens_per_s == pytest.approx(1 / ratio)


@pytest.mark.parametrize("runtime", ["eager", "cuda_graphs"])
def test_prefill_is_as_much_faster_as_it_does_fewer_flops(
        runs: dict[tuple[str, str, str], Result], runtime: str) -> None:
    """Prefill of 2048 tokens is compute bound: the time ratio is at least the FLOP ratio r
    and at most r + (1 − r)(1 − s), s the dense step's share at the tensor cores' sustained
    peak (the rest assumed not to shrink)."""
    dense, small = runs["dense", "prefill", runtime], runs["small", "prefill", runtime]
    r = _flops(small.ops) / _flops(dense.ops)
    hw = load_hardware(A100)
    tensor = hw.cores.units["tensor"]
    peak = hw.cores.count * tensor.ops_per_cycle["bf16"] * tensor.efficiency * hw.core_clock
    s = _flops(dense.ops) / peak / dense.latency_s
    assert 0.5 < s < 1
    ratio = small.latency_s / dense.latency_s
    assert r <= ratio <= r + (1 - r) * (1 - s), (ratio, r, s)
    assert abs(r - KEEP) < 0.01  # every matmul and the attention at 70 % width (lm_head whole)


# --- FLOPs, bytes and per-layer numbers follow the per-layer shapes ------------------------

def _layer_sum(trace: Trace, layer: str, kind: str) -> int:
    return sum(op.ops for op in trace.ops if op.layer == layer and op.kind == kind)


@pytest.mark.parametrize(("phase", "tokens", "context"), [("prefill", 16, 0), ("decode", 1, 16)])
def test_flops_are_the_closed_form_layer_by_layer(phase: str, tokens: int, context: int) -> None:
    """Matmuls: 2 × tokens × the layer's parameters less its two norms (q, k, v, o, SwiGLU);
    the LM head 2 × tokens × d × V; attention 4 × heads × head_dim × (query, key) pairs. In all:
    FLOPs = 2 T (params − embedding − norms) + Σ_l 4 h_l d_h P."""
    cfg = _mixed()
    trace = get_trace(cfg, phase, 1, context, tokens if phase == "prefill" else 0)
    d, hd, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    pairs = tokens * (tokens + 1) // 2 if phase == "prefill" else context + 1
    for i in cfg.layer_ids:
        name = f"layers.{i}"
        assert _layer_sum(trace, name, "matmul") == 2 * tokens * (cfg.layer_params(i) - 2 * d)
        assert _layer_sum(trace, name, "attention") == 4 * cfg.layer(i).heads * hd * pairs
    assert _layer_sum(trace, "lm_head", "matmul") == 2 * tokens * d * v
    linear = cfg.param_count - v * d - (2 * cfg.depth + 1) * d
    heads = sum(cfg.layer(i).heads for i in cfg.layer_ids)
    assert _flops(trace.ops) == 2 * tokens * linear + 4 * heads * hd * pairs


def test_weights_and_kv_cache_follow_the_layer_shapes() -> None:
    cfg = _mixed()
    trace = get_trace(cfg, "decode", 1, 16, 0)
    rope = cfg.depth * (cfg.head_dim // 2) * 4  # fp32 inverse frequencies per block
    assert trace.weights_bytes == cfg.param_count * cfg.dtype_bytes + rope
    kv = sum(cfg.layer(i).kv_heads for i in cfg.layer_ids)
    assert trace.state_bytes == 2 * kv * 17 * cfg.head_dim * cfg.dtype_bytes
    assert cfg.param_count == 2 * 32000 * 4096 + 4096 + sum(cfg.layer_param_counts)


def test_the_built_model_has_the_closed_form_parameters() -> None:
    from workloads.build import build_model

    cfg = _mixed(layers_kept=[0, 2, 3])
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.param_count
    for i in cfg.layer_ids:
        assert sum(p.numel() for p in model.layers[i].parameters()) == cfg.layer_params(i)
    assert model.layers[2].attn.q_proj.weight.shape == (16 * 128, 4096)
    assert model.layers[2].attn.k_proj.weight.shape == (8 * 128, 4096)
    assert model.layers[3].mlp.up_proj.weight.shape == (2048, 4096)


def test_heterogeneous_layers_have_their_own_latencies() -> None:
    result = simulate(A100, _mixed(), context=2048)
    latency = {layer.name: layer.latency_s for layer in result.layers}
    blocks = [latency[f"layers.{i}"] for i in range(4)]
    assert blocks == sorted(blocks, reverse=True) and len(set(blocks)) == 4
    same = simulate(A100, resolve_model("llama2-7b", {"num_hidden_layers": "4"}), context=2048)
    assert blocks[0] == pytest.approx(same.layers[1].latency_s)  # layer 0 is the dense layer


def test_a_list_of_one_value_is_the_scalar() -> None:
    scalar = resolve_model("llama2-7b", _sets({"num_hidden_layers": 4, "intermediate_size": FFN}))
    listed = resolve_model("llama2-7b", _sets({"num_hidden_layers": 4,
                                               "intermediate_size": [FFN] * 4}))
    assert listed.ffn_size == scalar.ffn_size == FFN
    one, two = (get_trace(cfg, "decode", 1, 16, 0) for cfg in (scalar, listed))
    assert [(o.name, o.ops, o.weight_bytes) for o in one.ops] == [
        (o.name, o.ops, o.weight_bytes) for o in two.ops]


def test_an_explicit_head_dim_is_honoured() -> None:
    cfg = resolve_model("tiny-llama", {"head_dim": "32"})  # hidden 64, 4 heads of 32
    trace = get_trace(cfg, "decode", 1, 8, 0)
    q = next(op for op in trace.ops if op.module == "layers.0.attn.q_proj")
    assert q.dims["n"] == 4 * 32
    attention = next(op for op in trace.ops if op.kind == "attention")
    assert attention.dims["head_dim"] == 32


def test_heterogeneous_widths_have_no_single_value() -> None:
    cfg = _mixed()
    for read in (lambda: cfg.ffn_size, lambda: cfg.kv_heads, lambda: cfg.layer_param_count):
        with pytest.raises(ValueError, match="layer"):
            read()


# --- removed blocks -------------------------------------------------------------------------

def test_fewer_layers_keep_the_first_ones() -> None:
    trace = get_trace(resolve_model("llama2-7b", {"num_hidden_layers": "3"}), "decode", 1, 8, 0)
    assert trace.layers()[1:-2] == ["layers.0", "layers.1", "layers.2"]


def test_layers_kept_builds_those_blocks_under_their_own_numbers() -> None:
    ffn = [11008] * 32
    ffn[5] = 4096  # per-layer lists are indexed by the original layer numbers
    cfg = resolve_model("llama2-7b", _sets({"layers_kept": [0, 2, 5, 31],
                                            "intermediate_size": ffn}))
    assert cfg.depth == 4 and cfg.num_hidden_layers == 32
    trace = get_trace(cfg, "decode", 1, 8, 0)
    assert trace.layers() == ["embed", "layers.0", "layers.2", "layers.5", "layers.31", "norm",
                              "lm_head"]
    assert _layer_sum(trace, "layers.5", "matmul") == 2 * (cfg.layer_params(5) - 2 * 4096)
    assert cfg.layer_params(5) < cfg.layer_params(2) == cfg.layer_params(31)
    assert trace.state_bytes == 4 * 2 * 32 * 9 * 128 * 2
    four = resolve_model("llama2-7b", {"num_hidden_layers": "4"})
    assert cfg.param_count == four.param_count - 3 * 11008 * 4096 + 3 * 4096 * 4096
    result = simulate(A100, cfg, context=8)
    assert [layer.name for layer in result.layers][1:5] == [
        "layers.0", "layers.2", "layers.5", "layers.31"]


# --- the CLI and files ----------------------------------------------------------------------

def test_model_set_takes_yaml_lists(capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve_model("tiny-llama", {"intermediate_size": "[64, 128]"}).intermediate_size == (
        64, 128)
    code = main(["--hw", A100, "--model", "tiny-llama", "--model-set",
                 "intermediate_size=[64, 128]", "--model-set", "layers_kept=[1]", "--format",
                 "json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [layer["name"] for layer in out["layers"]] == ["embed", "layers.1", "norm", "lm_head"]


def test_a_modegpt_style_yaml_file_runs(tmp_path: Path) -> None:
    path = tmp_path / "llama2-7b-modegpt70.yaml"
    path.write_text("model_type: llama\nhidden_size: 4096\nnum_hidden_layers: 4\n"
                    f"intermediate_size: [{FFN}, {FFN}, {FFN}, {FFN}]\n"
                    f"num_attention_heads: {HEADS}\nnum_key_value_heads: {HEADS}\n"
                    "head_dim: 128\nvocab_size: 32000\nmax_position_embeddings: 4096\n",
                    encoding="utf-8")
    cfg = resolve_model(str(path))
    assert cfg.param_count == _compressed(4).param_count


BAD_LISTS = [
    ({"intermediate_size": "[192]"}, "intermediate_size:", "expected num_hidden_layers = 2"),
    ({"intermediate_size": "[192, 0]"}, "intermediate_size[1]:", "greater than or equal to 1"),
    ({"intermediate_size": "[192, x]"}, "intermediate_size[1]:", "valid integer"),
    ({"intermediate_size": "[192, 1.5]"}, "intermediate_size[1]:", "valid integer"),
    ({"intermediate_size": "[192, [1]]"}, "intermediate_size[1]:", "valid integer"),
    ({"num_attention_heads": "[4, 0]", "head_dim": "16"}, "num_attention_heads[1]:",
     "greater than or equal to 1"),
    ({"num_attention_heads": "[4, 3]", "head_dim": "16"}, "num_attention_heads[1]:",
     "multiple of num_key_value_heads"),
    ({"num_attention_heads": "[4, 4, 4]", "head_dim": "16"}, "num_attention_heads:",
     "has 3 values"),
    ({"num_attention_heads": "[4, 4]"}, "--model-set num_attention_heads:", "head_dim"),
    ({"num_key_value_heads": "[2, 3]"}, "num_key_value_heads[1]:", "3 KV heads"),
    ({"num_key_value_heads": "[2, 8]"}, "num_key_value_heads[1]:", "multiple"),
    ({"layers_kept": "[1, 1]"}, "layers_kept[1]:", "strictly increasing"),
    ({"layers_kept": "[1, 0]"}, "layers_kept[1]:", "strictly increasing"),
    ({"layers_kept": "[0, 2]"}, "layers_kept[1]:", "below num_hidden_layers = 2"),
    ({"layers_kept": "[-1]"}, "layers_kept[0]:", "greater than or equal to 0"),
    ({"layers_kept": "[]"}, "layers_kept:", "at least 1"),
    ({"layers_kept": "3"}, "layers_kept:", "valid tuple"),
    ({"head_dim": "15"}, "head_dim:", "even"),
    ({"head_dim": "0"}, "head_dim:", "greater than or equal to 1"),
]


@pytest.mark.parametrize(("sets", "where", "what"), BAD_LISTS)
def test_every_bad_list_is_one_line(sets: dict[str, str], where: str, what: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    flags = [arg for key, value in sets.items() for arg in ("--model-set", f"{key}={value}")]
    refused(capsys, ["--hw", A100, "--model", "tiny-llama", *flags], where, what)


def test_a_bad_list_in_a_file_names_the_file_and_index(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 256,
                                "num_hidden_layers": 4, "num_attention_heads": 4,
                                "intermediate_size": [192, 192, 192, -5]}), encoding="utf-8")
    refused(capsys, ["--hw", A100, "--model", str(path)], f"{path}: intermediate_size[3]:")


@pytest.mark.parametrize(("key", "value", "what"), [
    ("intermediate_size", "[192, 192]", "llama only"),
    ("num_attention_heads", "[1, 1]", "llama only"),
    ("layers_kept", "[1]", "num_hidden_layers=N keeps the first N"),
])
def test_hgrn_bit_takes_no_lists(key: str, value: str, what: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["--hw", "fpga_1core.yaml", "--model", "tiny", "--model-set",
                      f"{key}={value}"], what)
