"""Model configs never give a silent wrong answer, and traces are keyed by the code that made
them (issue "Validation you can trust", items 6 and 7)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import refused

import simulator.workload.cache as cache
from simulator.api import simulate
from simulator.cli import main
from simulator.errors import UserError
from workloads.config import IGNORED_FIELDS, PRESETS, resolve_model

HW = "fpga_1core.yaml"
#: tiny-llama as an HF config.json would write it.
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 192, "vocab_size": 256}
#: tiny (HGRN-Bit) as the MMfreeLM configs write it (../shared/reference/matmulfree.md §5.1).
TINY_HGRN: dict[str, Any] = {
    "model_type": "hgrn_bit", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 1,
    "intermediate_size": 192, "vocab_size": 256, "attn_mode": "fused_recurrent",
    "conv_size": 4, "expand_ratio": 1, "fuse_cross_entropy": True, "hidden_act": "swish",
    "hidden_ratio": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "share_conv_kernel": True, "tie_word_embeddings": False, "use_lower_bound": True,
    "use_short_conv": False, "use_cache": True, "initializer_range": 0.02,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    "transformers_version": "4.39.1", "architectures": ["HGRNBitForCausalLM"]}


def _config(tmp_path: Path, base: dict[str, Any], drop: tuple[str, ...] = (), **extra: Any
            ) -> str:
    data = {k: v for k, v in base.items() if k not in drop} | extra
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


# --- unknown fields -----------------------------------------------------------------------

def test_a_misspelt_field_in_a_file_names_the_nearest_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, TINY_LLAMA, drop=("num_key_value_heads",), num_key_value_head=1)
    refused(capsys, ["--hw", HW, "--model", path], path, "num_key_value_head:",
             "unknown field", "did you mean num_key_value_heads?")


def test_a_misspelt_model_set_field_names_the_nearest_field(
        capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["--hw", HW, "--model", "tiny-llama", "--model-set",
                      "num_key_value_head=1"],
             "--model-set num_key_value_head", "did you mean num_key_value_heads?")


def test_an_unknown_field_with_no_near_name_lists_the_modelled_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, TINY_LLAMA, xyzzy=3)
    refused(capsys, ["--hw", HW, "--model", path], "xyzzy", "expected one of:",
             "num_key_value_heads")


def test_every_ignored_field_is_accepted_and_ignored(tmp_path: Path) -> None:
    extra = dict.fromkeys(IGNORED_FIELDS, 1) | {"pretraining_tp": 1, "rope_scaling": None}
    path = _config(tmp_path, TINY_LLAMA, **extra)
    expected = resolve_model("tiny-llama").model_copy(update={"max_position_embeddings": None})
    assert resolve_model(path).model_dump(exclude={"name"}) == expected.model_dump(
        exclude={"name"})


def test_a_real_llama_2_config_resolves_to_the_preset(tmp_path: Path) -> None:
    """meta-llama/Llama-2-7b-hf's config.json, with the fields newer transformers write."""
    hf = {"_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"],
          "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
          "eos_token_id": 2, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
          "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
          "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
          "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1,
          "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
          "tie_word_embeddings": False, "dtype": "bfloat16", "transformers_version": "4.56.0",
          "use_cache": True, "vocab_size": 32000}
    cfg = resolve_model(_config(tmp_path, hf))
    preset = resolve_model("llama2-7b")
    assert cfg.model_dump(exclude={"name", "rms_norm_eps"}) == preset.model_dump(
        exclude={"name", "rms_norm_eps"})


def test_an_mmfree_config_resolves_and_has_no_positional_limit(tmp_path: Path) -> None:
    cfg = resolve_model(_config(tmp_path, TINY_HGRN))
    tiny = resolve_model("tiny")
    assert (cfg.hidden_size, cfg.ffn_size, cfg.num_hidden_layers) == (
        tiny.hidden_size, tiny.ffn_size, tiny.num_hidden_layers)
    assert cfg.max_position_embeddings == 2048 and cfg.position_limit is None
    cfg.check_positions("decode", 100_000, 0)  # a recurrence has no positions to run out of


def test_the_readme_documents_every_ignored_field() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Model configs: fields", 1)[1]
    assert all(f"`{name}`" in section for name in IGNORED_FIELDS)


def test_every_preset_resolves_with_its_positional_limit() -> None:
    for name in PRESETS:
        cfg = resolve_model(name)
        expected = 4096 if name.startswith(("llama2-", "transformerpp-")) else None
        assert cfg.position_limit == expected, name


# --- fields that change the model but are not modelled ------------------------------------

NOT_MODELLED = [
    ("sliding_window", 4096, "sliding-window attention"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "RoPE scaling"),
    ("attention_bias", True, "attention projections"),
    ("mlp_bias", True, "MLP projections"),
    ("num_local_experts", 8, "mixture-of-experts"),
    ("num_experts", 60, "mixture-of-experts"),
    ("num_experts_per_tok", 2, "mixture-of-experts"),
    ("moe_intermediate_size", 1408, "mixture-of-experts"),
    ("hidden_act", "gelu", "activation"),
    ("pretraining_tp", 2, "pretraining_tp slices"),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}, "quantised"),
]


@pytest.mark.parametrize(("field", "value", "what"), NOT_MODELLED)
def test_a_llama_field_that_is_not_modelled_isrefused(
        field: str, value: Any, what: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, TINY_LLAMA, **{field: value})
    refused(capsys, ["--hw", HW, "--model", path], f"{path}: {field}:", what,
             "is not modelled", "; expected ")


NOT_MODELLED_HGRN = [
    ("use_short_conv", True, "short convolution", "expected false"),
    ("expand_ratio", 2, "expand_ratio", "expected 1"),
    ("use_lower_bound", False, "lower bounds", "expected true"),
    ("tie_word_embeddings", True, "tied embeddings", "expected false"),
    ("hidden_act", "relu", "activation", "expected silu"),
    ("head_dim", 32, "head size", "expected 64 or null"),  # llama honours any
]


@pytest.mark.parametrize(("field", "value", "what", "expected"), NOT_MODELLED_HGRN)
def test_an_hgrn_bit_field_that_is_not_modelled_isrefused(
        field: str, value: Any, what: str, expected: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, TINY_HGRN, **{field: value})
    refused(capsys, ["--hw", HW, "--model", path], f"{path}: {field}:", what,
             "not modelled", expected)


def test_a_glu_ratio_matters_only_for_a_null_intermediate_size(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve_model(_config(tmp_path, TINY_HGRN, hidden_ratio=3)).ffn_size == 192
    path = _config(tmp_path, TINY_HGRN, hidden_ratio=3, intermediate_size=None)
    refused(capsys, ["--hw", HW, "--model", path], "hidden_ratio", "not modelled",
             "expected 4")


def test_a_not_modelled_field_via_model_set_isrefused(
        capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["--hw", HW, "--model", "tiny-llama", "--model-set", "sliding_window=16"],
             "--model-set sliding_window", "sliding-window attention is not modelled",
             "expected null")


def test_head_dim_equal_to_hidden_over_heads_is_accepted(tmp_path: Path) -> None:
    assert resolve_model(_config(tmp_path, TINY_LLAMA, head_dim=16)).head_dim == 16


# --- model types --------------------------------------------------------------------------

MIXTRAL: dict[str, Any] = TINY_LLAMA | {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 8,
    "num_experts_per_tok": 2, "sliding_window": None, "max_position_embeddings": 32768}


def test_a_model_type_without_a_builder_isrefused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, {**MIXTRAL, "model_type": "mamba"})
    err = refused(capsys, ["--hw", HW, "--model", path],
                   "model_type 'mamba' is not implemented; expected one of",
                   "gpt2", "hgrn_bit", "llama", "mixtral")
    assert f"error: {path}: model_type" in err


def test_forcing_llama_onto_a_mixtral_config_isrefused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, MIXTRAL)
    refused(capsys, ["--hw", HW, "--model", path, "--model-set", "model_type=llama"],
             path, "num_", "mixture-of-experts is not modelled")


def test_a_model_set_model_type_without_a_builder_names_the_flag(
        capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["--hw", HW, "--model", "tiny", "--model-set", "model_type=mamba"],
             "--model-set model_type", "'mamba' is not implemented", "expected one of")


# --- positions ----------------------------------------------------------------------------

LIMITED = ["--model", "tiny-llama", "--model-set", "max_position_embeddings=16"]


def test_decode_past_the_positions_isrefused(capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["--hw", HW, *LIMITED, "--context", "16"], "--context:",
             "max_position_embeddings 16", "expected at most 15",
             "--model-set max_position_embeddings=N")


def test_prefill_past_the_positions_isrefused(capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["--hw", HW, *LIMITED, "--phase", "prefill", "--prompt", "17"],
             "--prompt:", "max_position_embeddings 16", "expected at most 16",
             "--model-set max_position_embeddings=N")


def test_a_file_limit_is_enforced_and_the_last_position_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, TINY_LLAMA, max_position_embeddings=32)
    refused(capsys, ["--hw", HW, "--model", path, "--context", "32"], "--context:",
             "max_position_embeddings 32")
    assert main(["--hw", HW, "--model", path, "--context", "31", "--format", "json"]) == 0
    assert main(["--hw", HW, "--model", path, "--context", "32", "--model-set",
                 "max_position_embeddings=33", "--format", "json"]) == 0
    capsys.readouterr()


def test_the_llama_2_preset_stops_at_4096(capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["--hw", HW, "--model", "llama2-7b", "--context", "100000"],
             "--context:", "max_position_embeddings 4096", "expected at most 4095")


def test_trace_and_check_enforce_the_positions(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trace.json"
    refused(capsys, ["trace", *LIMITED, "--context", "20", "-o", str(out)], "--context:",
             "max_position_embeddings 16")
    assert not out.exists()
    refused(capsys, ["check", "--hw", HW, *LIMITED, "--phase", "prefill", "--prompt", "20"],
             "--prompt:", "max_position_embeddings 16")


def test_the_python_api_enforces_the_positions() -> None:
    with pytest.raises(UserError, match="max_position_embeddings 16"):
        simulate(HW, "tiny-llama", context=16, model_set={"max_position_embeddings": "16"})


# --- files --------------------------------------------------------------------------------

def test_a_key_given_twice_isrefused(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 64, "hidden_size": 128}')
    refused(capsys, ["--hw", HW, "--model", str(path)], "hidden_size", "twice")
    yaml_path = tmp_path / "config.yaml"
    yaml_path.write_text("model_type: llama\nhidden_size: 64\nhidden_size: 128\n")
    refused(capsys, ["--hw", HW, "--model", str(yaml_path)], "config.yaml:3", "twice")


def test_dtype_and_torch_dtype_must_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    assert resolve_model(_config(tmp_path, TINY_LLAMA, dtype="float32")).dtype_bytes == 4
    path = _config(tmp_path, TINY_LLAMA, dtype="float32", torch_dtype="float16")
    refused(capsys, ["--hw", HW, "--model", path], "dtype", "expected one value for both")


# --- traces keyed by content --------------------------------------------------------------

@pytest.fixture
def fresh_hash() -> Iterator[None]:
    """Forget the process's code hash before and after (the test swaps the sources)."""
    cache.code_hash.cache_clear()
    yield
    cache.code_hash.cache_clear()


def _copy_sources(folder: Path) -> tuple[Path, ...]:
    folder.mkdir()
    return tuple(Path(shutil.copy(path, folder / path.name)) for path in cache.SOURCES)


def _tiny_key() -> str:
    return cache._key(resolve_model("tiny"), "decode", 1, 4, 0)


def test_the_fingerprint_covers_the_workloads_and_the_capture() -> None:
    names = {f"{p.parent.name}/{p.name}" for p in cache.SOURCES}
    workloads = Path(cache.__file__).resolve().parents[2] / "workloads"
    assert {f"workloads/{p.name}" for p in workloads.glob("*.py")} <= names
    assert {"workload/capture.py", "workload/trace.py"} <= names
    assert not hasattr(cache, "CAPTURE_VERSION")


def test_editing_a_workload_changes_the_trace_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_hash: None) -> None:
    real = _tiny_key()
    copies = _copy_sources(tmp_path / "src")
    monkeypatch.setattr(cache, "SOURCES", copies)
    cache.code_hash.cache_clear()
    assert _tiny_key() == real  # the same code, wherever it lies
    llama = next(p for p in copies if p.name == "llama.py")
    llama.write_bytes(llama.read_bytes().replace(b"F.silu", b"F.gelu", 1))
    cache.code_hash.cache_clear()
    assert _tiny_key() != real


def test_every_fingerprinted_byte_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         fresh_hash: None) -> None:
    copies = _copy_sources(tmp_path / "src")
    monkeypatch.setattr(cache, "SOURCES", copies)
    seen = {_tiny_key()}
    for path in copies:
        original = path.read_bytes()
        path.write_bytes(original + b" ")
        cache.code_hash.cache_clear()
        seen.add(_tiny_key())
        path.write_bytes(original)
    assert len(seen) == len(copies) + 1


@pytest.mark.parametrize("package", ["torch", "transformers"])
def test_the_torch_and_transformers_versions_are_in_the_key(
        monkeypatch: pytest.MonkeyPatch, fresh_hash: None, package: str) -> None:
    real = _tiny_key()
    version = cache._version
    monkeypatch.setattr(cache, "_version",
                        lambda name: "0.0-test" if name == package else version(name))
    cache.code_hash.cache_clear()
    assert _tiny_key() != real


def test_the_code_hash_is_computed_once_a_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_hash: None) -> None:
    first = cache.code_hash()
    copies = _copy_sources(tmp_path / "src")
    copies[0].write_bytes(b"changed")
    monkeypatch.setattr(cache, "SOURCES", copies)
    assert cache.code_hash() == first


def test_a_cached_run_does_not_import_torch() -> None:
    simulate(HW, "tiny", context=4)  # fills the session's cache (conftest's folder)
    code = ("import sys; from simulator.api import simulate; "
            f"simulate({HW!r}, 'tiny', context=4); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
