"""The Hugging Face front-end: every supported architecture (tiny configs), its trace
against torch's FlopCounterMode, closed-form parameter counts, sliding-window KV caches,
MoE routing policies, vision models and the python: form."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import simulator  # noqa: F401  (imports simulator before workloads, as the CLI does)
from simulator.api import simulate
from simulator.errors import UserError
from workloads.config import resolve_model
from workloads.hf_config import HFConfig

TINY: dict[str, dict[str, Any]] = {
    "llama": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 512,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 256},
              "max_position_embeddings": 4096},
    "mistral": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 512,
                "sliding_window": 64, "max_position_embeddings": 4096},
    "mixtral": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 512,
                "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen2": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 512},
    "qwen2_moe": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                  "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 512,
                  "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 128},
    "gemma2": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
               "vocab_size": 512, "sliding_window": 16},
    "phi3": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 512, "sliding_window": None,
             "pad_token_id": None, "eos_token_id": None},
    "gpt2": {"n_embd": 128, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 256},
    "gptj": {"n_embd": 128, "n_layer": 2, "n_head": 4, "vocab_size": 512, "rotary_dim": 16,
             "n_positions": 256},
    "opt": {"hidden_size": 128, "ffn_dim": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 512, "word_embed_proj_dim": 128,
            "max_position_embeddings": 256},
    "vit": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    "clip": {"text_config": {"hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4,
                             "vocab_size": 512, "max_position_embeddings": 16},
             "vision_config": {"hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4,
                               "image_size": 32, "patch_size": 8},
             "projection_dim": 32},
}
CAUSAL = [kind for kind in TINY if kind not in {"vit", "clip"}]


def _config(kind: str, **extra: Any) -> HFConfig:
    fields = {**TINY[kind], **extra}
    return HFConfig(model_type=kind, fields=fields, torch_dtype="bfloat16", name=f"tiny-{kind}")


def _file(tmp_path: Path, kind: str, **extra: Any) -> str:
    path = tmp_path / f"tiny-{kind}.json"
    path.write_text(json.dumps({"model_type": kind, **TINY[kind], **extra}))
    return str(path)


def _trace(cfg: HFConfig, phase: str = "decode", batch: int = 1, context: int = 40,
           prompt: int = 24):
    from simulator.workload.capture import capture

    return capture(cfg, phase, batch, context if phase == "decode" else 0,
                   prompt if phase == "prefill" else 0)


def _flop_counter(cfg: HFConfig, phase: str, batch: int, context: int, prompt: int) -> int:
    """torch's FlopCounterMode on the same meta forward (under no_grad)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from workloads.build import prepare

    step = prepare(cfg, phase, batch, context if phase == "decode" else 0,
                   prompt if phase == "prefill" else 0)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        step.run()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_matmul_flops_equal_torch_flop_counter(kind: str, phase: str) -> None:
    if kind in {"vit", "clip"}:
        phase = "forward"
    cfg = _config(kind)
    trace = _trace(cfg, phase, batch=2)
    ours = sum(op.ops for op in trace.ops if op.kind == "matmul")
    assert ours == _flop_counter(cfg, phase, 2, 40, 24)  # attention is our op: not counted
    assert any(op.kind == "attention" for op in trace.ops)
    assert any(op.kind == "norm" for op in trace.ops)
    layers = {op.layer for op in trace.ops}
    assert sum(layer[-2:] == ".0" or layer.endswith("layers.0") for layer in layers) >= 1


@pytest.mark.parametrize("kind", list(TINY))
def test_parameter_count_is_the_closed_form(kind: str) -> None:
    from workloads.hf import build_hf

    cfg = _config(kind)
    model = build_hf(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.param_count
    trace = _trace(cfg, "forward" if kind in {"vit", "clip"} else "decode")
    assert trace.weights_bytes == 2 * cfg.param_count + sum(
        b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.parametrize("kind", [kind for kind in CAUSAL if kind != "gemma2"])
def test_kv_cache_is_state_and_new_entries_are_state_writes(kind: str) -> None:
    cfg = _config(kind, sliding_window=None) if kind == "mistral" else _config(kind)
    c = cfg.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    head_dim = c.get("head_dim") or hidden // cfg.num_attention_heads
    trace = _trace(cfg, "decode", batch=2, context=40)
    per_token = 2 * layers * cfg.kv_heads * head_dim * 2  # K and V, bf16
    assert trace.state_bytes == 2 * 41 * per_token
    assert sum(op.state_write_bytes for op in trace.ops) == 2 * per_token


def test_sliding_window_bounds_kv_and_attention_span() -> None:
    window, context = TINY["mistral"]["sliding_window"], 1000
    trace = _trace(_config("mistral"), "decode", context=context)
    full = _trace(_config("mistral", sliding_window=None), "decode", context=context)
    assert trace.state_bytes * (context + 1) == full.state_bytes * window
    spans = {op.dims["kv_len"] for op in trace.ops if op.kind == "attention"}
    assert spans == {window}
    prefill = _trace(_config("mistral"), "prefill", prompt=200)
    attention = [op for op in prefill.ops if op.kind == "attention"]
    assert all(op.dims["window"] == window for op in attention)
    band = sum(min(i + 1, window) for i in range(200))
    assert all(op.dims["pairs"] == band for op in attention)


def test_gemma2_alternates_sliding_and_global_layers() -> None:
    trace = _trace(_config("gemma2"), "decode", context=100)
    spans = [op.dims["kv_len"] for op in trace.ops if op.kind == "attention"]
    assert spans == [16, 101]


def _expert_ops(trace) -> list:
    return [op for op in trace.ops if op.kind == "matmul" and ".experts" in op.module]


def test_mixtral_balanced_expert_flops_are_top_k_over_experts_of_dense() -> None:
    cfg = _config("mixtral")
    for phase, batch in (("decode", 1), ("decode", 8), ("prefill", 2)):
        trace = _trace(cfg, phase, batch=batch)
        tokens = trace.tokens
        d, i = cfg.hidden_size, cfg.config["intermediate_size"]
        dense = cfg.num_hidden_layers * 8 * tokens * 2 * 3 * d * i  # every expert, every token
        assert sum(op.ops for op in _expert_ops(trace)) * 8 == dense * 2
        assert all(sum(row) == 2 * tokens for row in trace.expert_tokens)
        assert all(max(row) - min(row) <= 1 for row in trace.expert_tokens)


def test_zipf_routing_skews_tokens_and_the_busiest_expert_bounds_the_layer() -> None:
    path_cfg = _config("mixtral")
    balanced = _trace(path_cfg, "prefill", batch=4, prompt=64)
    skewed_cfg = resolve_model_from(path_cfg, "zipf:1.5")
    skewed = _trace(skewed_cfg, "prefill", batch=4, prompt=64)
    assert [sum(r) for r in skewed.expert_tokens] == [sum(r) for r in balanced.expert_tokens]
    assert max(map(max, skewed.expert_tokens)) > 1.5 * max(map(max, balanced.expert_tokens))
    assert sum(op.ops for op in _expert_ops(skewed)) == sum(
        op.ops for op in _expert_ops(balanced))
    result = simulate("gpu_a100.yaml", skewed_cfg, phase="prefill", batch=4, prompt=64)
    counts = skewed.expert_tokens[0]
    busiest = max(counts)
    mine = [op for op in result.ops if op.layer == "model.layers.0"
            and ".experts" in op.module and op.kind == "matmul"]
    alone = sum(op.end_s - op.start_s for op in mine
                if skewed.ops[op.index].dims["m"] == busiest)
    layer = next(r for r in result.layers if r.name == "model.layers.0")
    assert layer.latency_s >= alone > 0
    assert result.expert_imbalance > 1.5


def resolve_model_from(cfg: HFConfig, routing: str) -> HFConfig:
    from workloads.routing import parse_routing

    return cfg.model_copy(update={"routing": parse_routing(routing)})


def test_routing_policies_are_reproducible_and_respect_top_k(tmp_path: Path) -> None:
    from workloads.routing import parse_routing

    for text in ("random:3", "zipf:1.2", "zipf:0.5:7"):
        policy = parse_routing(text)
        counts = policy.counts(0, 100, 8, 2)
        assert counts == policy.counts(0, 100, 8, 2) and sum(counts) == 200
        assert max(counts) <= 100
    histogram = tmp_path / "h.json"
    histogram.write_text(json.dumps([[5, 1, 1, 1, 0, 0, 0, 0]]))
    policy = parse_routing(f"file:{histogram}")
    # a token picks an expert at most once: the excess over T goes to the others by share
    assert policy.counts(0, 10, 8, 2) == [10, 4, 3, 3, 0, 0, 0, 0]
    for tokens in (1, 7, 2048):
        assert sum(policy.counts(3, tokens, 8, 2)) == 2 * tokens
    histogram.write_text(json.dumps([[1, 0, 0, 0, 0, 0, 0, 0]]))
    counts = parse_routing(f"file:{histogram}").counts(0, 2048, 8, 2)
    assert sum(counts) == 4096 and counts[0] == 2048
    histogram.write_text(json.dumps([[1] * 8] * 3))
    with pytest.raises(UserError, match=r"3 rows; expected 1 .* or 2"):
        parse_routing(f"file:{histogram}").check(2, 8)
    histogram.write_text(json.dumps([[1] * 7]))
    with pytest.raises(UserError, match="7 experts; expected 8"):
        parse_routing(f"file:{histogram}").check(2, 8)
    histogram.write_text("[[1, Infinity]]")
    for bad in ("zipf", "random:x", "random:-1", "balanced:", "file:/nonexistent.json",
                "uniform", f"file:{histogram}"):
        with pytest.raises(UserError, match="--moe-routing"):
            parse_routing(bad)


def test_routing_is_refused_for_dense_models(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--moe-routing: .* has no experts"):
        resolve_model(_file(tmp_path, "mistral"), routing="zipf:1")
    with pytest.raises(UserError, match="--moe-routing"):
        resolve_model("llama2-7b", routing="balanced")


def test_unknown_fields_are_refused_with_the_nearest_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"sliding_windw: unknown field .*sliding_window"):
        resolve_model(_file(tmp_path, "mistral", sliding_windw=4))
    with pytest.raises(UserError, match="--model-set num_local_expert"):
        resolve_model(_file(tmp_path, "mixtral"), {"num_local_expert": "4"})
    with pytest.raises(UserError, match="quantization_config"):
        resolve_model(_file(tmp_path, "qwen2", quantization_config={"bits": 4}))
    with pytest.raises(UserError, match="hidden_size: expected a whole number"):
        resolve_model(_file(tmp_path, "qwen2", hidden_size="wide"))


def test_phases_follow_the_task(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--phase: .* forward"):
        simulate("gpu_a100.yaml", _file(tmp_path, "vit"), phase="decode")
    with pytest.raises(UserError, match=r"--phase: .* decode or prefill"):
        simulate("gpu_a100.yaml", _file(tmp_path, "gpt2"), phase="forward")
    with pytest.raises(UserError, match="--context"):
        simulate("gpu_a100.yaml", _file(tmp_path, "gpt2"), context=256)


def test_vision_forward_reports_images() -> None:
    result = simulate("gpu_a100.yaml", _config("vit"), phase="forward", batch=4)
    assert result.tokens == 4 and result.tokens_per_s > 0
    patches = (32 // 8) ** 2 + 1
    trace = _trace(_config("vit"), "forward", batch=4)
    attention = [op for op in trace.ops if op.kind == "attention"]
    assert {op.dims["q_len"] for op in attention} == {patches}
    assert not any(op.dims["causal"] for op in attention)


def test_resnet50_python_factory_has_torchvision_parameters() -> None:
    import torch

    from workloads.resnet import resnet50

    with torch.device("meta"):
        model, _ = resnet50()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    cfg = resolve_model("python:workloads.resnet:resnet50")
    trace = _trace(cfg, "forward", batch=2)
    convs = [op for op in trace.ops if op.fn == "convolution"]
    assert len(convs) == 53  # 49 in the bottlenecks and stem, 4 projections
    # FLOPs: 2 · 4.09 G multiply-adds per image at 224² (He et al. Table 1: 3.8 G counts
    # the convolutions without the projections' and the FC's)
    macs = sum(op.ops for op in trace.ops if op.kind == "matmul") / 2 / 2
    assert 4.0e9 < macs < 4.2e9
    assert resolve_model("resnet50").name == "resnet50"


def test_python_form_refuses_what_it_cannot_run(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in ("python:nonexistent_pkg.mod:f", "python:workloads.resnet", "python::f"):
        with pytest.raises(UserError, match="--model"):
            resolve_model(spec)
    (tmp_path / "user_models.py").write_text(
        "import torch\n"
        "notcallable = 3\n"
        "def raises():\n    raise RuntimeError('boom')\n"
        "def not_a_pair():\n    return 5\n"
        "def cpu_inputs():\n"
        "    return torch.nn.Linear(4, 4), torch.zeros(2, 4, device='cpu')\n"
        "def bad_shape():\n    return torch.nn.Linear(4, 4), torch.zeros(2, 5)\n"
        "def missing(batch=1):\n    return no_such_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for factory, fragment in (("notcallable", "is a int"), ("raises", "RuntimeError: boom"),
                              ("not_a_pair", "returned int"), ("cpu_inputs", "meta device"),
                              ("bad_shape", "failed to run its example inputs"),
                              ("missing", "NameError")):
        with pytest.raises(UserError, match=fragment):
            simulate("gpu_a100.yaml", f"python:user_models:{factory}")
    with pytest.raises(UserError, match=r"--batch: .* takes no batch keyword"):
        simulate("gpu_a100.yaml", "python:user_models:bad_shape", batch=2)
    with pytest.raises(UserError, match="--model-set"):
        resolve_model("python:workloads.resnet:resnet50", {"hidden_size": "4"})


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_hf_llama_and_our_llama_builder_trace_the_same_work(phase: str) -> None:
    """Llama-3-8B at two layers, by transformers and by workloads/llama.py: the same GEMMs,
    attention, parameters, KV cache and KV writes, and a latency within 5 %."""
    from workloads.config import catalog

    fields = {k: v for k, v in catalog()["llama3-8b"].data().items() if k != "model_type"}
    fields["num_hidden_layers"] = 2
    ours = resolve_model("llama3-8b", {"num_hidden_layers": "2"})
    theirs = HFConfig(model_type="llama", fields=fields, torch_dtype="bfloat16", name="hf")
    assert theirs.param_count == ours.param_count
    a, b = (_trace(cfg, phase, batch=2, context=300, prompt=128) for cfg in (ours, theirs))

    def work(trace, kind: str) -> list[int]:
        return sorted(op.ops for op in trace.ops if op.kind == kind)

    assert work(a, "matmul") == work(b, "matmul")
    assert [op.dims["pairs"] for op in a.ops if op.kind == "attention"] == [
        op.dims["pairs"] for op in b.ops if op.kind == "attention"]
    assert a.state_bytes == b.state_bytes
    assert sum(op.state_write_bytes for op in a.ops) == sum(op.state_write_bytes for op in b.ops)
    assert len(work(a, "norm")) == len(work(b, "norm"))
    kwargs = {"phase": phase, "batch": 2, "context": 300, "prompt": 128}
    mine, hf = (simulate("gpu_a100.yaml", cfg, **kwargs).latency_s for cfg in (ours, theirs))
    assert hf == pytest.approx(mine, rel=0.05)


def test_heads_must_divide_the_width_where_there_is_no_head_dim(tmp_path: Path) -> None:
    for kind, change, field in (("vit", {"hidden_size": 66}, "num_attention_heads"),
                                ("gpt2", {"n_head": 5}, "n_head"),
                                ("opt", {"num_attention_heads": 5}, "num_attention_heads")):
        with pytest.raises(UserError, match=f"{field}: .* heads do not divide"):
            resolve_model(_file(tmp_path, kind, **change))


def test_bad_values_are_one_line_refusals(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from cli_helpers import refused

    path = _file(tmp_path, "mistral")
    base = ["--hw", "gpu_a100.yaml", "--model", path, "--context", "8"]
    for setting, fragment in (("intermediate_size=-5", "expected a whole number ≥ 1"),
                              ("intermediate_size=wide", "expected a whole number ≥ 1"),
                              ("sliding_window=0", "expected a whole number ≥ 1"),
                              ("tie_word_embeddings=3", "expected true or false"),
                              ("rope_theta=abc", "expected a number"),
                              ("hidden_act=nonsense", "transformers cannot build it")):
        refused(capsys, [*base, "--model-set", setting], setting.split("=")[0], fragment)


_VALUES = st.one_of(st.integers(-3, 1 << 20), st.sampled_from([0, 1, 2, 3, 7, 64, None]),
                    st.floats(allow_nan=True), st.text(max_size=4), st.booleans(),
                    st.sampled_from([[], {}, [1, 2], ["full_attention"], {"rope_type": "x"}]))
_FIELDS = ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
           "head_dim", "sliding_window", "num_local_experts", "num_experts_per_tok", "n_embd",
           "n_head", "n_layer", "ffn_dim", "vocab_size", "max_position_embeddings",
           "num_experts", "moe_intermediate_size", "mlp_only_layers", "layer_types",
           "image_size", "patch_size", "num_labels", "id2label", "text_config", "qkv_bias",
           "word_embed_proj_dim", "rope_scaling", "tie_word_embeddings"]


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(sorted(TINY)),
       changes=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, min_size=1, max_size=2))
def test_fuzzed_hf_configs_run_right_or_are_refused_in_one_line(
        kind: str, changes: dict[str, Any]) -> None:
    """Each fuzzed config either runs, and then its closed-form size is the built model's,
    or is refused in one line."""
    import io

    from simulator.cli import main
    from workloads.hf import build_hf

    with tempfile_json({"model_type": kind, **TINY[kind], **changes}) as path:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["--hw", "gpu_a100.yaml", "--model", path, "--format", "json"])
        lines = err.getvalue().strip().splitlines()
        assert code == 0 or (code == 2 and len(lines) == 1 and lines[0].startswith(
            "simulate: error: ")), err.getvalue()[-800:]
        if code == 0:
            cfg = resolve_model(path)
            assert sum(p.numel() for p in build_hf(cfg).parameters()) == cfg.param_count


@contextlib.contextmanager
def tempfile_json(data: dict[str, Any]):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(data, allow_nan=True))
        yield str(path)
