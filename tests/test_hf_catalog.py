"""Every catalog entry that transformers builds: it builds, traces (reduced depth) and
simulates; closed-form parameter counts against the built models and the published sizes;
the numbers the issue asks to defend (Mistral-7B's window, Mixtral's experts)."""

from __future__ import annotations

import pytest

from simulator.api import simulate
from simulator.errors import UserError
from workloads.config import catalog, resolve_model
from workloads.hf_config import HFConfig

A100 = "gpu_a100.yaml"
HF = [name for name, entry in catalog().items()
      if isinstance(resolve_model(name), HFConfig)]
#: Published sizes (model cards / papers), in billions.
PUBLISHED = {"mistral-7b": 7.24, "mixtral-8x7b": 46.70, "qwen2-7b": 7.62, "gemma2-9b": 9.24,
             "phi3-mini": 3.82, "gpt2-xl": 1.558, "gpt-j-6b": 6.05, "opt-1.3b": 1.316,
             "opt-6.7b": 6.66, "vit-b-16": 0.0866, "clip-vit-b-16": 0.1496,
             "qwen2-57b-a14b": 57.41, "qwen1.5-moe-a2.7b": 14.32, "gpt2": 0.124,
             "gpt2-medium": 0.355, "gpt2-large": 0.774}
#: GPT-3 (Brown et al. 2020, Table 2.1, n_params as rounded there), in billions.
GPT3 = {"gpt3-small": 0.125, "gpt3-medium": 0.350, "gpt3-large": 0.760, "gpt3-xl": 1.3,
        "gpt3-2.7b": 2.7}
TOO_BIG = {"mixtral-8x7b", "qwen2-57b-a14b"}


def _depth(cfg: HFConfig) -> dict[str, str]:
    key = "n_layer" if cfg.model_type in {"gpt2", "gptj"} else "num_hidden_layers"
    return {} if cfg.model_type == "clip" else {key: "2"}


@pytest.mark.parametrize("name", HF)
def test_every_entry_builds_traces_and_simulates(name: str) -> None:
    from workloads.hf import build_hf

    full = resolve_model(name)
    cfg = resolve_model(name, _depth(full))
    model = build_hf(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.param_count
    phase = "decode" if cfg.task == "causal" else "forward"
    result = simulate(A100, cfg, phase=phase, context=256, batch=2)
    assert result.latency_s > 0 and result.weights_bytes >= 2 * cfg.param_count
    layers = [layer.name for layer in result.layers if layer.name[-1].isdigit()]
    assert len(layers) == (24 if cfg.model_type == "clip" else 2)


@pytest.mark.parametrize("name", HF)
def test_every_entry_resolves_by_name_hf_id_and_file(name: str) -> None:
    entry = catalog()[name]
    by_name = resolve_model(name)
    if entry.hf_id:
        for hf_id in (entry.hf_id, entry.hf_id.upper()):
            assert resolve_model(hf_id) == by_name
    by_file = resolve_model(str(entry.path))
    def unset(cfg: HFConfig) -> dict:
        return {k: v for k, v in cfg.fields.items() if k not in entry.model_set}

    assert unset(by_file) == unset(by_name) and by_file.model_type == by_name.model_type
    assert by_name.torch_dtype == "bfloat16"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_sizes(name: str) -> None:
    assert resolve_model(name).param_count / 1e9 == pytest.approx(PUBLISHED[name], rel=0.005)


@pytest.mark.parametrize("name", sorted(GPT3))
def test_gpt3_sizes_match_the_papers_rounded_counts(name: str) -> None:
    assert resolve_model(name).param_count / 1e9 == pytest.approx(GPT3[name], rel=0.02)


def test_gpt2_small_has_124439808_parameters_with_tied_embeddings() -> None:
    assert resolve_model("gpt2").param_count == 124_439_808


@pytest.mark.parametrize("name", sorted(TOO_BIG))
def test_models_larger_than_one_a100_are_refused_with_their_weights(name: str) -> None:
    cfg = resolve_model(name, {"num_hidden_layers": "2"})
    gib = resolve_model(name).param_count * 2 / (1 << 30)
    with pytest.raises(UserError, match=r"does not fit: needs") as err:
        simulate(A100, name, context=256)
    assert f"weights {gib:.2f}" in str(err.value)
    result = simulate(A100, cfg, context=256, hw_set={"memory.dram.capacity": "640 GB"})
    assert result.latency_s > 0 and result.weights_bytes >= 2 * cfg.param_count


def test_mistral_kv_at_32k_is_the_4096_window() -> None:
    cfg = resolve_model("mistral-7b", {"num_hidden_layers": "2"})
    trace = simulate(A100, cfg, context=32767)
    per_token = 2 * 2 * 8 * 128 * 2  # K and V, two layers, 8 KV heads × 128, bf16
    assert trace.state_bytes == 4096 * per_token


def test_mixtral_decode_balanced_experts_are_two_of_eight() -> None:
    cfg = resolve_model("mixtral-8x7b", {"num_hidden_layers": "1"})
    result = simulate(A100, cfg, context=128, batch=4,
                      hw_set={"memory.dram.capacity": "640 GB"})
    experts = [op for op in result.ops if ".experts" in op.module and op.kind == "matmul"]
    d, i = 4096, 14336
    assert sum(op.ops for op in experts) == 2 * 4 * 2 * 3 * d * i  # top-2 of 8, 4 tokens
    assert result.expert_imbalance == 1.0


#: Dense decoders of the catalog (our llama builder included) for the 2·N·T check.
DENSE = ["llama3-8b", "mistral-7b", "qwen2-7b", "gemma2-9b", "phi3-mini", "gpt2-xl",
         "gpt-j-6b", "opt-1.3b"]


@pytest.mark.parametrize("name", DENSE)
def test_prefill_gemm_flops_are_two_n_t(name: str) -> None:
    """GEMM FLOPs of a 128-token prefill within 2 % of 2·N·T, N the parameters every token
    is multiplied by: all but the input embeddings (token and position tables), the LM head
    counted once whether tied or not. Attention's own FLOPs are its op's, not in the sum."""
    from simulator.workload.cache import get_trace

    full = resolve_model(name)
    cfg = resolve_model(name, _depth(full) if isinstance(full, HFConfig)
                        else {"num_hidden_layers": "2"})
    trace = get_trace(cfg, "prefill", 1, 0, 128)
    c = cfg.config if isinstance(cfg, HFConfig) else {}
    d, v = cfg.hidden_size, cfg.vocab_size
    embeddings = v * d + (c["n_positions"] * d if cfg.model_type == "gpt2" else 0)
    if cfg.model_type == "opt":
        embeddings = v * c["word_embed_proj_dim"] + (c["max_position_embeddings"] + 2) * d
    head = v * (c.get("word_embed_proj_dim") or d)
    n = cfg.param_count - embeddings - (0 if cfg.tie_word_embeddings else head) + head
    if cfg.model_type == "gptj":
        n -= v  # the head's bias is added, not multiplied
    gemm = sum(op.ops for op in trace.ops if op.kind == "matmul")
    assert gemm == pytest.approx(2 * n * 128, rel=0.02)
