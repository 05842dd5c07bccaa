"""Trace extraction: op counts and bytes of every preset against closed forms."""

from pathlib import Path

import pytest

from simulator.workload.cache import get_trace
from simulator.workload.trace import Trace
from workloads.config import PRESETS, ModelConfig, glu_size, resolve_model

PAPER_PRESETS = [name for name in PRESETS if not name.startswith("tiny")]
CONTEXT = 16


def _mmfree_ternary(cfg: ModelConfig) -> int:
    d, i, n = cfg.hidden_size, cfg.ffn_size, cfg.num_hidden_layers
    return n * (4 * d * d + 3 * d * i) + d * cfg.vocab_size


def _mmfree_weight_bytes(cfg: ModelConfig) -> int:
    d, i, n, v = cfg.hidden_size, cfg.ffn_size, cfg.num_hidden_layers, cfg.vocab_size
    half = 2  # bf16
    per_layer_fp = (8 * d + i) + d  # BitLinear/block norms (§6.4) + lower bound
    return (half * (v * d + n * per_layer_fp + 2 * d) + _mmfree_ternary(cfg) // 4
            + 4 * (6 * n + 1))


def _llama_matmul_flops(cfg: ModelConfig) -> int:
    d, i, n, kv = cfg.hidden_size, cfg.ffn_size, cfg.num_hidden_layers, cfg.kv_heads
    kv_dim = kv * cfg.head_dim
    return 2 * (n * (2 * d * d + 2 * d * kv_dim + 3 * d * i) + d * cfg.vocab_size)


def _llama_weight_bytes(cfg: ModelConfig) -> int:
    d, i, n, v = cfg.hidden_size, cfg.ffn_size, cfg.num_hidden_layers, cfg.vocab_size
    kv_dim = cfg.kv_heads * cfg.head_dim
    params = 2 * v * d + n * (2 * d * d + 2 * d * kv_dim + 3 * d * i + 2 * d) + d
    return 2 * params + n * (cfg.head_dim // 2) * 4  # + RoPE inverse frequencies (fp32)


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_decode_trace_matches_closed_form(name: str) -> None:
    cfg = resolve_model(name)
    trace = get_trace(cfg, "decode", 1, CONTEXT, 0)
    kinds = {op.kind for op in trace.ops}
    if cfg.model_type == "hgrn_bit":
        ternary = [op for op in trace.ops if op.kind == "ternary_matmul"]
        assert len(ternary) == 6 * cfg.num_hidden_layers + 1
        assert sum(op.ops for op in ternary) == _mmfree_ternary(cfg)
        assert sum(op.weight_bytes for op in ternary) == _mmfree_ternary(cfg) // 4
        assert trace.weights_bytes == _mmfree_weight_bytes(cfg)
        assert trace.state_bytes == 4 * cfg.num_hidden_layers * cfg.hidden_size
        assert "matmul" not in kinds and "attention" not in kinds
    else:
        matmuls = [op for op in trace.ops if op.kind == "matmul"]
        assert len(matmuls) == 7 * cfg.num_hidden_layers + 1
        assert sum(op.ops for op in matmuls) == _llama_matmul_flops(cfg)
        attention = [op for op in trace.ops if op.kind == "attention"]
        assert sum(op.ops for op in attention) == (
            4 * cfg.num_attention_heads * cfg.head_dim * (CONTEXT + 1) * cfg.num_hidden_layers)
        assert trace.weights_bytes == _llama_weight_bytes(cfg)
        assert trace.state_bytes == (2 * cfg.num_hidden_layers * cfg.kv_heads * (CONTEXT + 1)
                                     * cfg.head_dim * 2)
    assert trace.tokens == 1
    assert all(dep < op.index for op in trace.ops for dep in op.deps)
    assert trace.layers()[0] == "embed" and trace.layers()[-1] == "lm_head"
    assert [f"layers.{i}" for i in range(cfg.num_hidden_layers)] == trace.layers()[1:-2]


def test_paper_sizes() -> None:
    assert [resolve_model(f"mmfree-{s}").ffn_size for s in ("370m", "1.3b", "2.7b")] == [
        2816, 5632, 6912]  # matmulfree.md §5.1
    assert glu_size(1024) == 2816
    assert resolve_model("1.3b") == resolve_model("mmfree-1.3b")


def test_prefill_counts_scale_with_prompt_and_causal_attention() -> None:
    cfg = resolve_model("tiny-llama")
    prompt = 12
    trace = get_trace(cfg, "prefill", 2, 0, prompt)
    matmul = sum(op.ops for op in trace.ops if op.kind == "matmul")
    assert matmul == 2 * prompt * _llama_matmul_flops(cfg)
    attention = sum(op.ops for op in trace.ops if op.kind == "attention")
    pairs = prompt * (prompt + 1) // 2
    assert attention == 2 * 4 * cfg.num_attention_heads * cfg.head_dim * pairs * 2
    assert trace.tokens == 2 * prompt
    assert trace.state_bytes == 2 * 2 * 2 * cfg.kv_heads * prompt * cfg.head_dim * 2


def test_kv_cache_read_and_write_in_decode() -> None:
    cfg = resolve_model("tiny-llama")
    trace = get_trace(cfg, "decode", 1, 30, 0)
    attention = [op for op in trace.ops if op.kind == "attention"]
    per_layer_cache = 2 * cfg.kv_heads * 31 * cfg.head_dim * 2
    assert all(op.state_read_bytes == per_layer_cache for op in attention)
    writes = [op for op in trace.ops if op.state_write_bytes]
    assert sum(op.state_write_bytes for op in writes) == (
        2 * cfg.num_hidden_layers * cfg.kv_heads * cfg.head_dim * 2)


def test_module_paths_and_dependencies() -> None:
    trace = get_trace(resolve_model("tiny"), "decode", 1, 4, 0)
    ternary = [op for op in trace.ops if op.kind == "ternary_matmul"]
    assert [op.module for op in ternary[:6]] == [
        "layers.0.attn.i_proj", "layers.0.attn.f_proj", "layers.0.attn.g_proj",
        "layers.0.attn.o_proj", "layers.0.mlp.gate_proj", "layers.0.mlp.down_proj"]
    ancestors: dict[int, set[int]] = {}
    for op in trace.ops:
        ancestors[op.index] = set(op.deps).union(*(ancestors[d] for d in op.deps))
    i_proj, f_proj, o_proj = ternary[0], ternary[1], ternary[3]
    assert i_proj.index not in ancestors[f_proj.index]  # independent: may overlap
    assert {i_proj.index, f_proj.index} <= ancestors[o_proj.index]


def test_save_load_roundtrip(tmp_path: Path) -> None:
    trace = get_trace(resolve_model("tiny"), "decode", 2, 4, 0)
    path = tmp_path / "trace.json"
    trace.save(path)
    assert Trace.load(path) == trace
    assert path.read_text() == trace.to_json()


def test_cache_hit_returns_equal_trace() -> None:
    cfg = resolve_model("tiny")
    assert get_trace(cfg, "decode", 3, 5, 0) == get_trace(cfg, "decode", 3, 5, 0, use_cache=False)
