"""The model catalog (issue "Any model a user already has", item 3): shipped HF configs for
the Llama family, found by name or HF id, sized by a closed form that matches the published
parameter counts and the traced models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import refused

from simulator.api import simulate
from simulator.cli import main
from simulator.errors import UserError
from simulator.hardware import load_hardware
from simulator.workload.cache import get_trace
from workloads.config import (
    CATALOG_DIR,
    PRESETS,
    ModelConfig,
    catalog,
    model_names,
    resolve_model,
)

ROOT = Path(__file__).resolve().parents[1]
A100 = "gpu_a100.yaml"
#: Published sizes, in billions (Llama 2 and Llama 3 HF model cards / safetensors counts;
#: LLaMA-1: Touvron et al. 2023, Table 2, 33B being 32.5 B and 65B 65.2 B).
PUBLISHED = {"llama2-7b": 6.74, "llama2-13b": 13.02, "llama2-70b": 68.98, "llama3-8b": 8.03,
             "llama3-70b": 70.55, "llama-13b": 13.0, "llama-33b": 32.5, "llama-65b": 65.2}
#: Catalog entries whose bf16 weights and KV cache at context 1024 fit one A100 80GB.
FITS_ONE_A100 = {"llama2-7b", "llama2-13b", "llama3-8b", "llama-13b", "llama-33b"}
#: The Llama family (our own builder); test_hf_catalog.py covers the architectures
#: transformers builds.
NAMES = [name for name in catalog() if name in PUBLISHED]
CONTEXT = 1024  # within every catalog entry's positions (LLaMA-1: 2048)


def _reduced(name: str, layers: int, **extra: str) -> ModelConfig:
    return resolve_model(name, {"num_hidden_layers": str(layers), **extra})


def _rope_bytes(cfg: ModelConfig) -> int:
    """The traced weights also hold each layer's RoPE inverse frequencies (fp32 buffers)."""
    return cfg.num_hidden_layers * (cfg.head_dim // 2) * 4


# --- the catalog itself -------------------------------------------------------------------

ISSUE_NAMES = {"llama2-7b", "llama2-70b", "llama3-8b", "llama-13b", "llama-33b", "llama-65b",
               "mistral-7b", "mixtral-8x7b", "qwen2-7b", "gemma2-9b", "phi3-mini", "gpt2",
               "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-j-6b", "gpt3-small", "gpt3-medium",
               "gpt3-large", "gpt3-xl", "gpt3-2.7b", "opt-1.3b", "opt-6.7b", "vit-b-16",
               "clip-vit-b-16"}


def test_the_catalog_holds_the_models_the_issue_names() -> None:
    assert set(NAMES) == set(PUBLISHED)
    assert set(catalog()) >= ISSUE_NAMES
    assert {"qwen2-57b-a14b", "qwen1.5-moe-a2.7b"} & set(catalog())
    assert {path.stem for path in CATALOG_DIR.glob("*.json")} == set(catalog())
    ids = [entry.hf_id.lower() for entry in catalog().values() if entry.hf_id]
    assert len(set(ids)) == len(ids)
    for entry in catalog().values():
        if entry.hf_id is None:  # no checkpoint (GPT-3): the paper's Table 2.1
            assert entry.source == "https://arxiv.org/abs/2005.14165"
        else:
            assert entry.source == (f"https://huggingface.co/{entry.hf_id}/blob/main/"
                                    "config.json")
        assert set(entry.model_set) <= {"torch_dtype", "num_labels"}, entry.name


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_resolves_by_name_hf_id_and_file(name: str) -> None:
    entry = catalog()[name]
    by_name = resolve_model(name)
    assert by_name.name == name and by_name.model_type == "llama"
    for hf_id in (entry.hf_id, entry.hf_id.upper(), entry.hf_id.lower()):
        assert resolve_model(hf_id) == by_name
    by_file = resolve_model(str(entry.path))
    differs = {"name", *entry.model_set}
    assert by_file.model_dump(exclude=differs) == by_name.model_dump(exclude=differs)
    assert by_name.torch_dtype == "bfloat16"


def test_the_transcribed_shapes() -> None:
    shapes = {name: (c.hidden_size, c.ffn_size, c.num_hidden_layers, c.num_attention_heads,
                     c.kv_heads, c.vocab_size, c.max_position_embeddings, c.rope_theta,
                     c.rms_norm_eps)
              for name, c in ((name, resolve_model(name)) for name in NAMES)}
    assert shapes == {
        "llama2-7b": (4096, 11008, 32, 32, 32, 32000, 4096, 10000.0, 1e-5),
        "llama2-13b": (5120, 13824, 40, 40, 40, 32000, 4096, 10000.0, 1e-5),
        "llama2-70b": (8192, 28672, 80, 64, 8, 32000, 4096, 10000.0, 1e-5),
        "llama3-8b": (4096, 14336, 32, 32, 8, 128256, 8192, 500000.0, 1e-5),
        "llama3-70b": (8192, 28672, 80, 64, 8, 128256, 8192, 500000.0, 1e-5),
        "llama-13b": (5120, 13824, 40, 40, 40, 32000, 2048, 10000.0, 1e-6),
        "llama-33b": (6656, 17920, 60, 52, 52, 32000, 2048, 10000.0, 1e-6),
        "llama-65b": (8192, 22016, 80, 64, 64, 32000, 2048, 10000.0, 1e-5),
    }
    assert not any(resolve_model(name).tie_word_embeddings for name in NAMES)


def test_llama2_presets_come_from_the_catalog_with_the_old_shapes() -> None:
    """The hand-written presets were _llama(4096, 32, 32, 11008) and (5120, 40, 40, 13824) with
    vocab 32000, untied, bf16, 4096 positions and the default eps 1e-6; the catalog corrects
    only the eps to the HF file's 1e-5."""
    for name, (d, layers, heads, inter) in {"llama2-7b": (4096, 32, 32, 11008),
                                            "llama2-13b": (5120, 40, 40, 13824)}.items():
        assert PRESETS[name] == catalog()[name].data()
        old = ModelConfig(model_type="llama", hidden_size=d, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads,
                          intermediate_size=inter, vocab_size=32000,
                          max_position_embeddings=4096, name=name)
        assert resolve_model(name).model_dump() == old.model_copy(
            update={"rms_norm_eps": 1e-5}).model_dump()


def test_a_norms_epsilon_does_not_change_the_cost() -> None:
    new = simulate(A100, "llama2-7b", context=64, model_set={"num_hidden_layers": "2"})
    old = simulate(A100, "llama2-7b", context=64,
                   model_set={"num_hidden_layers": "2", "rms_norm_eps": "1.0e-6"})
    assert (new.latency_s, new.energy_j, new.dram_bytes) == (
        old.latency_s, old.energy_j, old.dram_bytes)


# --- sizes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_the_published_sizes(name: str) -> None:
    assert resolve_model(name).param_count == pytest.approx(PUBLISHED[name] * 1e9, rel=0.01)


def test_exact_parameter_counts() -> None:
    """The closed form gives the checkpoints' exact counts (e.g. Llama-2-7B 6,738,415,616)."""
    assert {name: resolve_model(name).param_count for name in NAMES} == {
        "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320,
        "llama2-70b": 68_976_648_192, "llama3-8b": 8_030_261_248,
        "llama3-70b": 70_553_706_496, "llama-13b": 13_015_864_320,
        "llama-33b": 32_528_943_616, "llama-65b": 65_285_660_672}


@pytest.mark.parametrize("name", NAMES)
def test_the_closed_form_is_the_traced_model(name: str) -> None:
    """Reduced-depth copies: whole-model and per-layer parameters equal the traced weights'
    bytes over the dtype's (less the RoPE buffers), and the built model's parameters."""
    from workloads.build import build_model

    one, two = _reduced(name, 1), _reduced(name, 2)
    traced = {n: get_trace(cfg, "decode", 1, 4, 0) for n, cfg in ((1, one), (2, two))}
    for cfg, trace in ((one, traced[1]), (two, traced[2])):
        assert trace.weights_bytes - _rope_bytes(cfg) == cfg.param_count * cfg.dtype_bytes
    per_layer = traced[2].weights_bytes - traced[1].weights_bytes
    assert per_layer == two.layer_param_count * two.dtype_bytes + two.head_dim // 2 * 4
    model = build_model(two)
    assert sum(p.numel() for p in model.parameters()) == two.param_count
    assert sum(p.numel() for p in model.layers[0].parameters()) == two.layer_param_count
    full = resolve_model(name)
    assert full.param_count == (two.param_count - 2 * two.layer_param_count
                                + full.num_hidden_layers * full.layer_param_count)


def test_tied_embeddings_are_counted_once() -> None:
    from workloads.build import build_model

    untied = _reduced("llama3-8b", 1)
    tied = _reduced("llama3-8b", 1, tie_word_embeddings="true")
    assert untied.param_count - tied.param_count == tied.vocab_size * tied.hidden_size
    assert get_trace(tied, "decode", 1, 4, 0).weights_bytes - _rope_bytes(tied) == (
        tied.param_count * tied.dtype_bytes)
    assert sum(p.numel() for p in build_model(tied).parameters()) == tied.param_count


@pytest.mark.parametrize("name", ["tiny", "mmfree-370m"])
def test_the_hgrn_bit_closed_form_is_the_built_model(name: str) -> None:
    """HGRN-Bit keeps its ternary matrices packed and its lower bounds as buffers: count each
    matrix as in × out parameters, as the fla checkpoints do."""
    from workloads.build import build_model
    from workloads.hgrn_bit import BitLinear

    cfg = resolve_model(name, {"num_hidden_layers": "2"})
    model = build_model(cfg)
    ternary = sum(m.in_features * m.out_features for m in model.modules()
                  if isinstance(m, BitLinear))
    bounds = sum(layer.attn.lower_bound.numel() for layer in model.layers)
    assert sum(p.numel() for p in model.parameters()) + ternary + bounds == cfg.param_count


# --- running them -------------------------------------------------------------------------

def test_the_entries_that_fit_one_a100_are_the_expected_ones() -> None:
    capacity = load_hardware(A100).memory.dram.capacity
    for name in NAMES:
        cfg = resolve_model(name)
        kv = 2 * cfg.num_hidden_layers * cfg.kv_heads * cfg.head_dim * (CONTEXT + 1)
        need = (cfg.param_count + kv) * cfg.dtype_bytes
        assert (need < capacity) == (name in FITS_ONE_A100), name


@pytest.mark.parametrize("name", sorted(FITS_ONE_A100))
def test_entries_that_fit_one_a100_simulate_decode(name: str) -> None:
    result = simulate(A100, name, context=CONTEXT, model_set={"num_hidden_layers": "2"})
    assert result.model == f"{name} num_hidden_layers=2"
    assert result.latency_s > 0 and result.tokens_per_s > 0


@pytest.mark.parametrize("name", sorted(set(NAMES) - FITS_ONE_A100))
def test_65b_and_70b_do_not_fit_one_a100_but_fit_eight(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = resolve_model(name)
    weights_gib = (cfg.param_count * cfg.dtype_bytes + _rope_bytes(cfg)) / (1 << 30)
    assert weights_gib > 120
    refused(capsys, ["--hw", A100, "--model", name, "--context", str(CONTEXT)], "--model",
             f"{name} does not fit: needs", f"(weights {weights_gib:.2f},", "GiB",
             "memory.dram.capacity")
    result = simulate(A100, name, context=CONTEXT, hw_set={"memory.dram.capacity": "640 GB"},
                      model_set={"num_hidden_layers": "2"})
    assert result.tokens_per_s > 0


def test_llama_1_has_2048_positions() -> None:
    cfg = resolve_model("llama-65b")
    cfg.check_positions("decode", 2047, 0)
    with pytest.raises(UserError, match="max_position_embeddings 2048"):
        cfg.check_positions("decode", 2048, 0)


# --- lookup from the command line ---------------------------------------------------------

def test_an_hf_id_on_the_command_line_is_the_catalog_entry(
        capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    for model in ("llama2-7b", "META-LLAMA/llama-2-7B-HF"):
        assert main(["--hw", A100, "--model", model, "--model-set", "num_hidden_layers=2",
                     "--context", "64", "--format", "json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1]
    assert outputs[0]["model"] == "llama2-7b num_hidden_layers=2"


def test_an_hf_id_not_in_the_catalog_asks_for_its_config_json(
        capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["--hw", A100, "--model", "mistralai/Mistral-7B-v0.3"], "--model",
             "mistralai/Mistral-7B-v0.3", "not", "catalog", "nothing is downloaded",
             "config.json")
    refused(capsys, ["--hw", A100, "--model", "meta-llama/Llama-2-7b-chat-hf"],
             "did you mean meta-llama/Llama-2-7b-hf")


def test_an_unknown_name_suggests_the_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["--hw", A100, "--model", "llama-2-70b"], "unknown model 'llama-2-70b'",
             "did you mean llama2-70b")
    refused(capsys, ["--hw", A100, "--model", "Llama3-8B-Instruct"], "did you mean llama3-8b")
    err = refused(capsys, ["--hw", A100, "--model", "gpt-5"], "unknown model 'gpt-5'",
                   "did you mean")
    assert "gpt2" in err


def test_a_config_path_and_a_checkpoint_folder_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "meta-llama" / "Llama-2-7b-hf"
    folder.mkdir(parents=True)
    shutil.copy(catalog()["llama2-7b"].path, folder / "config.json")
    by_path = resolve_model(str(folder / "config.json"))
    by_folder = resolve_model(str(folder))
    assert by_folder.name == "Llama-2-7b-hf" and by_path.name == "config"
    assert by_folder.model_dump(exclude={"name"}) == by_path.model_dump(exclude={"name"})
    assert by_path.torch_dtype == "float16"  # the file's dtype: the preset's model_set is not
    (tmp_path / "empty").mkdir()
    refused(capsys, ["--hw", A100, "--model", str(tmp_path / "empty")], "without a config.json")


# --- simulate list ------------------------------------------------------------------------

def test_list_shows_every_model_with_its_size_and_reads_no_torch() -> None:
    probe = ("import sys; from simulator.cli import main; main(['list']); "
             "assert 'torch' not in sys.modules, 'simulate list imported torch'")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=120).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert set(model_names()) <= set(rows)
    assert rows["llama2-70b"][1:] == ["68.98", "B", "untied", "80", "8192", "64/8", "1",
                                      "4096", "bfloat16", "meta-llama/Llama-2-70b-hf"]
    assert rows["llama3-8b"][1:3] == ["8.03", "B"] and rows["llama3-8b"][8] == "8192"
    assert rows["mmfree-1.3b"][6:9] == ["1/—", "1", "—"]
    assert "fpga_8core.yaml" in out and "1.3b = mmfree-1.3b" in out


def test_the_wheel_ships_the_catalog() -> None:
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    globs = setup["setuptools"]["package-data"]["workloads"]
    shipped = {p.relative_to(CATALOG_DIR.parent) for g in globs
               for p in CATALOG_DIR.parent.glob(g)}
    placements = CATALOG_DIR.parent / "placements"
    assert shipped == {p.relative_to(CATALOG_DIR.parent) for p in CATALOG_DIR.iterdir()} | {
        Path("hf_fields.json")} | {p.relative_to(CATALOG_DIR.parent)
                                    for p in placements.glob("*.yaml")}
