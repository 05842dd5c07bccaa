"""Model configurations: HF-style fields, presets for the paper sizes, the catalog of shipped
HF configs (configs/), files and overrides."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Collection, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from simulator.errors import UserError, first_error
from simulator.yamlfile import load_yaml

if TYPE_CHECKING:
    from workloads.models import AnyModel

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}


def glu_size(hidden: int) -> int:
    """The HGRN-Bit/fla rule for a null intermediate size: 256 · ⌈⌊8d/3⌋ / 256⌉."""
    return 256 * math.ceil(int(hidden * 4 * 2 / 3) / 256)


class FieldProblem(ValueError):
    """A config check that names its field, with a list index where one is at fault
    (`intermediate_size[3]`); `resolve_model` shows it as the error's place."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _per_layer(limit: int) -> PlainValidator:
    """Validate one integer in [1, limit] or a list of them (kept as a tuple)."""
    scalar = TypeAdapter(Annotated[int, Field(ge=1, le=limit)])

    def one(value: Any, where: str) -> int:
        try:
            return scalar.validate_python(value)
        except ValidationError as exc:
            raise FieldProblem(where, exc.errors()[0]["msg"]) from None

    def check(value: Any, info: ValidationInfo) -> int | tuple[int, ...]:
        name = str(info.field_name)
        if isinstance(value, list | tuple):
            return tuple(one(item, f"{name}[{i}]") for i, item in enumerate(value))
        return one(value, name)

    return PlainValidator(check)


#: A width that may differ per layer: one integer for every layer, or a list of
#: num_hidden_layers of them, indexed by the original layer numbers.
PerLayer = int | tuple[int, ...]
#: The fields that take a per-layer list (llama only).
PER_LAYER = ("intermediate_size", "num_attention_heads", "num_key_value_heads")


class LayerShape(NamedTuple):
    """One block's widths: query heads, KV heads and the MLP's intermediate size."""

    heads: int
    kv_heads: int
    ffn_size: int


def _at(value: PerLayer | None, index: int) -> int | None:
    return value[index] if isinstance(value, tuple) else value


def check_phase(name: str, phase: str, phases: tuple[str, ...]) -> None:
    """Refuse a step `phase` that model `name` has not (a causal LM's decode or prefill, an
    encoder's forward)."""
    if phase not in phases:
        kind = ("a causal LM" if "decode" in phases
                else "an encoder: one forward pass over a batch of inputs")
        raise UserError("--phase", f"{name} is {kind}; expected "
                        + " or ".join(phases) + f", not {phase}")


class ModelConfig(BaseModel):
    """The fields of an HF `config.json` that decide a model's shape and cost (others are
    refused here; `resolve_model` sorts a whole HF config's fields first)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_type: Literal["llama", "hgrn_bit"]
    hidden_size: int = Field(ge=1, le=1 << 17)
    intermediate_size: Annotated[PerLayer, _per_layer(1 << 19)] | None = None
    #: The original depth; per-layer lists have this many values.
    num_hidden_layers: int = Field(ge=1, le=1024)
    #: The blocks built (removed-block compression): original layer numbers, increasing.
    layers_kept: tuple[Annotated[int, Field(ge=0)], ...] | None = Field(default=None,
                                                                         min_length=1)
    num_attention_heads: Annotated[PerLayer, _per_layer(4096)] = 1
    num_key_value_heads: Annotated[PerLayer, _per_layer(4096)] | None = None
    #: Left out: hidden_size / num_attention_heads (filled in when the config is validated).
    head_dim: int | None = Field(default=None, ge=1, le=1 << 14)
    vocab_size: int = Field(ge=1, le=1 << 22)
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    tie_word_embeddings: bool = False
    #: Positions a sequence may reach (None: no limit); hgrn_bit has none whatever it says.
    max_position_embeddings: int | None = Field(default=None, ge=1, le=1 << 24)
    name: str = ""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.model_type == "hgrn_bit":
            _uniform_only(self)
        else:
            _check_lists(self)
            _check_kept(self)
        heads = self.num_attention_heads
        if self.head_dim is None and isinstance(heads, int) and not self.hidden_size % heads:
            # HF's default, stored so that the key and the builders see one value (the model
            # is frozen, and nobody has seen it yet)
            self.__dict__["head_dim"] = self.hidden_size // heads
        if self.model_type == "llama":
            _check_heads(self)
        return self

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """The blocks built, by their original layer numbers: layers_kept, else all."""
        return self.layers_kept or tuple(range(self.num_hidden_layers))

    @property
    def depth(self) -> int:
        """How many blocks are built."""
        return len(self.layer_ids)

    def layer(self, index: int) -> LayerShape:
        """The widths of original layer `index` (what per-layer lists are indexed by)."""
        heads = _at(self.num_attention_heads, index) or 1
        kv = _at(self.num_key_value_heads, index) or heads
        return LayerShape(heads, kv, _at(self.intermediate_size, index)
                          or glu_size(self.hidden_size))

    def _uniform(self, what: str) -> int:
        values = {getattr(self.layer(i), what) for i in self.layer_ids}
        if len(values) > 1:
            raise ValueError(f"{what} differs between layers; read layer(index).{what}")
        return values.pop()

    @property
    def kv_heads(self) -> int:
        """KV heads of every layer (ValueError if they differ: see `layer`)."""
        return self._uniform("kv_heads")

    @property
    def ffn_size(self) -> int:
        """The MLP's intermediate size in every layer (ValueError if it differs)."""
        return self._uniform("ffn_size")

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.torch_dtype]

    def layer_params(self, index: int) -> int:
        """Parameters of original block `index`, closed form. llama: q, k, v, o (heads ×
        head_dim wide), SwiGLU and two norms. hgrn_bit (as the fla checkpoints count them):
        the ternary i, f, g, o and GLU matrices, a norm per BitLinear, g_norm, two block norms
        and the forget-gate lower bound."""
        d, shape = self.hidden_size, self.layer(index)
        i = shape.ffn_size
        if self.model_type == "hgrn_bit":
            return 4 * d * d + 3 * d * i + 9 * d + i
        q_dim, kv_dim = shape.heads * self.head_dim, shape.kv_heads * self.head_dim
        return 2 * d * q_dim + 2 * d * kv_dim + 3 * d * i + 2 * d

    @property
    def layer_param_counts(self) -> tuple[int, ...]:
        """Parameters of each block built, in order."""
        return tuple(self.layer_params(i) for i in self.layer_ids)

    @property
    def layer_param_count(self) -> int:
        """Parameters of one block, every block's (ValueError if they differ: see
        `layer_param_counts`)."""
        counts = set(self.layer_param_counts)
        if len(counts) > 1:
            raise ValueError("blocks differ in size; read layer_param_counts")
        return counts.pop()

    @property
    def param_count(self) -> int:
        """Parameters of the whole model, closed form, embeddings included: the embedding,
        the LM head unless tied to it (hgrn_bit's is ternary, with its BitLinear norm), the
        final norm and every block built, each at its own widths. No buffers (RoPE
        frequencies)."""
        d, v = self.hidden_size, self.vocab_size
        if self.model_type == "hgrn_bit":
            outside = 2 * v * d + 2 * d
        else:
            outside = (1 if self.tie_word_embeddings else 2) * v * d + d
        return outside + sum(self.layer_param_counts)

    @property
    def experts(self) -> int:
        """Experts per MoE layer: 1, every modelled model is dense (MoE fields are refused)."""
        return 1

    @property
    def position_limit(self) -> int | None:
        """Most positions a sequence may reach: none for the recurrent hgrn_bit (no RoPE,
        no position table), max_position_embeddings for llama."""
        return None if self.model_type == "hgrn_bit" else self.max_position_embeddings

    @property
    def phases(self) -> tuple[str, ...]:
        """The steps a causal LM has (the first is the default)."""
        return ("decode", "prefill")

    def check_positions(self, phase: str, context: int, prompt: int) -> None:
        """Refuse a phase the model has not, or a step that reaches past the model's
        positions (decode: context + 1)."""
        check_phase(self.name, phase, self.phases)
        limit = self.position_limit
        flag, need = ("--context", context + 1) if phase == "decode" else ("--prompt", prompt)
        if limit is None or need <= limit:
            return
        what = (f"context {context} + 1 new token" if phase == "decode"
                else f"a prompt of {prompt} tokens")
        most = limit - 1 if phase == "decode" else limit
        raise UserError(flag, f"{what} needs {need} positions, beyond the model's "
                        f"max_position_embeddings {limit}; expected at most {most} "
                        "(--model-set max_position_embeddings=N asks for more)")

    def key(self) -> str:
        """A stable text key of every field (for caches)."""
        return json.dumps(self.model_dump(), sort_keys=True)


def _uniform_only(cfg: ModelConfig) -> None:
    """hgrn_bit has one width for every block and no removed blocks."""
    for name in PER_LAYER:
        if isinstance(getattr(cfg, name), tuple):
            raise FieldProblem(name, "per-layer lists are modelled for llama only; expected "
                               "one integer for hgrn_bit")
    if cfg.layers_kept is not None:
        raise FieldProblem("layers_kept", "removed blocks are modelled for llama only; expected "
                           "it left out (num_hidden_layers=N keeps the first N blocks)")


def _check_lists(cfg: ModelConfig) -> None:
    """Each per-layer list has one value per layer of the original depth."""
    n = cfg.num_hidden_layers
    for name in PER_LAYER:
        value = getattr(cfg, name)
        if isinstance(value, tuple) and len(value) != n:
            raise FieldProblem(name, f"has {len(value)} values; expected num_hidden_layers = "
                               f"{n}, one per original layer (removed ones included)")


def _check_kept(cfg: ModelConfig) -> None:
    """layers_kept: original layer numbers, strictly increasing, below the original depth."""
    for pos, index in enumerate(cfg.layers_kept or ()):
        if index >= cfg.num_hidden_layers:
            raise FieldProblem(f"layers_kept[{pos}]", f"is {index}; expected a layer number "
                               f"below num_hidden_layers = {cfg.num_hidden_layers}")
        if pos and index <= cfg.layers_kept[pos - 1]:
            raise FieldProblem(f"layers_kept[{pos}]", f"is {index} after "
                               f"{cfg.layers_kept[pos - 1]}; expected strictly increasing "
                               "layer numbers")


def _check_heads(cfg: ModelConfig) -> None:
    """llama: a head size to build with (even, for RoPE), and in every layer a head count
    that is a multiple of its KV heads."""
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if cfg.head_dim is None and isinstance(heads, tuple):
        raise FieldProblem("num_attention_heads", "a per-layer list needs the head size; "
                           "expected head_dim set too (the dense model's hidden_size / "
                           "num_attention_heads, e.g. 128)")
    if cfg.head_dim is None:
        raise FieldProblem("num_attention_heads", "hidden_size must be a multiple of "
                           "num_attention_heads; expected a divisor of hidden_size, or head_dim")
    if cfg.head_dim % 2:
        raise FieldProblem("head_dim", f"{cfg.head_dim} (hidden_size / num_attention_heads "
                           "unless given) is odd; expected an even head size (RoPE rotates "
                           "channel pairs)")
    for i in range(cfg.num_hidden_layers):
        shape = cfg.layer(i)
        if shape.heads % shape.kv_heads:
            name = ("num_attention_heads" if isinstance(heads, tuple) or not isinstance(kv, tuple)
                    else "num_key_value_heads")
            where = f"{name}[{i}]" if isinstance(getattr(cfg, name), tuple) else name
            raise FieldProblem(where, f"{shape.heads} query heads over {shape.kv_heads} KV "
                               "heads; expected num_attention_heads a multiple of "
                               "num_key_value_heads")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(str(path), f"cannot be read as a UTF-8 model config ({exc})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}", f"is not valid JSON: {exc.msg}") from None
        except ValueError as exc:
            raise UserError(str(path), str(exc)) from None
    else:
        data = load_yaml(text, str(path))
    if not isinstance(data, dict):
        raise UserError(str(path), "expected a mapping of HF config fields")
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"key '{key}' appears twice; expected each key once")
        data[key] = value
    return data


#: The model catalog: public HF config.json files, transcribed (README "Model catalog").
CATALOG_DIR = Path(__file__).resolve().parent / "configs"
CATALOG_INDEX = CATALOG_DIR / "catalog.yaml"


class CatalogEntry(BaseModel):
    """One shipped config, `configs/NAME.json`, and its entry in `configs/catalog.yaml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    #: The HF repository id (owner/name) whose config.json the file transcribes.
    #: None for a model without a published checkpoint (GPT-3: its paper's shapes).
    hf_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    #: The file transcribed (huggingface.co), or the paper that defines the model's shape
    #: where no checkpoint was published (GPT-3: arxiv.org).
    source: str = Field(pattern=r"^https://(huggingface\.co|arxiv\.org)/")
    #: Fields the preset sets over the file (typed values, as --model-set would).
    model_set: dict[str, Any] = Field(default_factory=dict)
    notes: str = ""

    @property
    def path(self) -> Path:
        return CATALOG_DIR / f"{self.name}.json"

    def data(self) -> dict[str, Any]:
        """The transcribed config with the preset's model_set over it (a fresh dict)."""
        return _catalog_file(self.path) | self.model_set


@cache
def _catalog_file(path: Path) -> dict[str, Any]:
    """A shipped catalog file, read once per process (callers get copies)."""
    return _read_file(path)


@cache
def catalog() -> dict[str, CatalogEntry]:
    """The catalog's entries by preset name, in the index's order."""
    entries: dict[str, CatalogEntry] = {}
    for name, fields in _read_file(CATALOG_INDEX).items():
        where = f"{CATALOG_INDEX}: {name}"
        if not isinstance(fields, dict):
            raise UserError(where, "expected a mapping with hf_id, source, model_set, notes")
        try:
            entries[name] = CatalogEntry.model_validate({**fields, "name": name})
        except ValidationError as exc:
            field, message = first_error(exc.errors())
            raise UserError(f"{where}.{field}", message) from None
    return entries


def _mmfree(hidden: int, layers: int, inter: int | None = None) -> dict[str, Any]:
    return {"model_type": "hgrn_bit", "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": inter, "num_attention_heads": 1, "vocab_size": 32000}


def _llama(hidden: int, layers: int, heads: int, inter: int | None = None) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads,
            "intermediate_size": inter, "vocab_size": 32000, "max_position_embeddings": 4096}


# MatMul-free (HGRN-Bit) sizes: ../shared/reference/matmulfree.md §5.1 (Table 1, HF configs);
# 13B is not published: Llama-2 13B's shape (d = 5120, L = 40), as the paper compares at 13B.
# Transformer++ shares (L, d) with them (paper Table 1); heads follow flash-linear-attention's
# default of 16 up to 1.3B and a head dim of 128 beyond (assumption: not in the paper).
# Positions: Llama-2's 4096 (its HF configs) for llama2-* and, as Llama-2 models, for
# transformerpp-* (assumption: the paper trains at 2048 but states no limit); the recurrent
# mmfree-* have no positional limit (None). llama2-7b/13b are read from the catalog; the
# catalog's other models (`catalog()`) are presets too, by name or HF id (`model_names()`).
PRESETS: dict[str, dict[str, Any]] = {
    "mmfree-370m": _mmfree(1024, 24),
    "mmfree-1.3b": _mmfree(2048, 24, 5632),
    "mmfree-2.7b": _mmfree(2560, 32),
    "mmfree-13b": _mmfree(5120, 40),
    "transformerpp-370m": _llama(1024, 24, 16),
    "transformerpp-1.3b": _llama(2048, 24, 16),
    "transformerpp-2.7b": _llama(2560, 32, 20),
    "transformerpp-13b": _llama(5120, 40, 40),
    # Llama-2 (Touvron et al. 2023): configs/llama2-*.json, HF meta-llama/Llama-2-*-hf
    "llama2-7b": catalog()["llama2-7b"].data(),
    "llama2-13b": catalog()["llama2-13b"].data(),
    # A tiny model for functional checks and fast tests.
    "tiny": _mmfree(64, 2, 192) | {"vocab_size": 256},
    "tiny-llama": _llama(64, 2, 4, 192) | {"vocab_size": 256, "num_key_value_heads": 2,
                                           "max_position_embeddings": None},
}
ALIASES = {"370m": "mmfree-370m", "1.3b": "mmfree-1.3b", "2.7b": "mmfree-2.7b",
           "13b": "mmfree-13b"}


#: HF config fields that cannot change the simulated cost: accepted with any value and
#: ignored (why, for the README's "Model configs: fields"). Every other field is modelled,
#: checked by RULES, or refused as unknown.
IGNORED_FIELDS: dict[str, str] = {
    "_name_or_path": "where the checkpoint was saved from",
    "architectures": "the HF class name; model_type chooses the builder",
    "auto_map": "the HF remote-code classes; model_type chooses the builder",
    "transformers_version": "the library version that wrote the file",
    "bos_token_id": "a tokenizer id",
    "eos_token_id": "a tokenizer id",
    "pad_token_id": "a tokenizer id",
    "initializer_range": "weight initialisation for training",
    "use_cache": "a generate() switch; a simulated step always keeps its KV cache or state",
    "attention_dropout": "dropout is off at inference",
    "fuse_cross_entropy": "a training-loss kernel (HGRN-Bit)",
    "attn_mode": "which GPU kernel runs the same HGRN recurrence; the mapping decides that",
    "conv_size": "sizes the short convolution, which use_short_conv: true would add (refused)",
    "share_conv_kernel": "shapes the short convolution, as conv_size",
    "max_sequence_length": "a LLaMA-1 conversion field transformers never reads; "
                           "max_position_embeddings is the limit",
}
#: A check of a field the builders do not read: None if the value is what they compute.
Rule = Callable[[Any, Mapping[str, Any]], str | None]
IMPLEMENTED = ("llama", "hgrn_bit")


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _only(*allowed: Any, what: str) -> Rule:
    """A rule accepting only `allowed` (1.0 is 1, but true is not 1)."""

    def rule(value: Any, _data: Mapping[str, Any]) -> str | None:
        if any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
            return None
        return (f"{what} is not modelled (got {_shown(value)}); expected "
                + " or ".join(_shown(a) for a in allowed))

    return rule


def _head_dim(value: Any, data: Mapping[str, Any]) -> str | None:
    """hgrn_bit has no attention heads to size; llama models (and validates) any head_dim."""
    hidden = data.get("hidden_size")
    heads = data.get("num_attention_heads") or data.get("num_heads") or 1
    if data.get("model_type") == "llama" or value is None or not isinstance(hidden, int) or (
            not isinstance(heads, int) or heads < 1):
        return None  # the hidden size and heads are validated later
    if value == hidden / heads:
        return None
    return (f"a head size other than hidden_size / num_attention_heads is not modelled "
            f"(got {_shown(value)}); expected {hidden // heads} or null")


def _hidden_ratio(value: Any, data: Mapping[str, Any]) -> str | None:
    if data.get("intermediate_size") is not None:
        return None  # it only sizes a null intermediate_size
    return _only(4, None, what="a GLU ratio other than 4 for a null intermediate_size")(
        value, data)


def _tied(value: Any, data: Mapping[str, Any]) -> str | None:
    if data.get("model_type") != "hgrn_bit" or value is not True:
        return None
    return "tied embeddings in hgrn_bit (its LM head is ternary) are not modelled; expected false"


def _attention_only(value: Any, data: Mapping[str, Any]) -> str | None:
    if data.get("model_type") != "hgrn_bit" or value is None:
        return None
    return "does not apply to hgrn_bit (it has no attention); expected the field left out"


def _heads_alias(value: Any, data: Mapping[str, Any]) -> str | None:
    if data.get("model_type") == "hgrn_bit":
        return None
    return "is the hgrn_bit name of the head count; expected num_attention_heads"


MOE_FIELDS = ("num_local_experts", "num_experts", "num_experts_per_tok", "n_routed_experts",
              "n_shared_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
              "moe_layer_freq", "first_k_dense_replace", "decoder_sparse_step")
#: Fields that change the model but that the builders do not read: accepted only at the value
#: the builders compute anyway, else refused as not modelled.
RULES: dict[str, Rule] = {
    "sliding_window": _only(None, what="sliding-window attention"),
    "rope_scaling": _only(None, what="RoPE scaling"),
    "attention_bias": _only(False, None, what="a bias on the attention projections"),
    "mlp_bias": _only(False, None, what="a bias on the MLP projections"),
    "pretraining_tp": _only(1, None, what="splitting the matmuls into pretraining_tp slices"),
    "hidden_act": _only("silu", "swish", what="an activation other than SiLU (SwiGLU/GLU)"),
    "quantization_config": _only(None, what="a quantised checkpoint"),
    "head_dim": _head_dim,
    "hidden_ratio": _hidden_ratio,
    "use_short_conv": _only(False, None, what="the short convolution of HGRN"),
    "expand_ratio": _only(1, None, what="an MLGRU wider than hidden_size (expand_ratio)"),
    "use_lower_bound": _only(True, None, what="an MLGRU without forget-gate lower bounds"),
    **dict.fromkeys(MOE_FIELDS, _only(None, what="mixture-of-experts")),
    "tie_word_embeddings": _tied,
    "rope_theta": _attention_only,
    "num_key_value_heads": _attention_only,
    "num_heads": _heads_alias,
}
#: Other spellings of modelled fields: HGRN-Bit's num_heads; transformers ≥ 4.56's dtype.
ALIAS_FIELDS = {"num_heads": "num_attention_heads", "dtype": "torch_dtype"}


def _coerce(key: str, text: str) -> Any:
    return load_yaml(text, f"--model-set {key}") if text.strip() else None


def _modelled() -> list[str]:
    return [f for f in ModelConfig.model_fields if f != "name"]


def _known() -> list[str]:
    return sorted({*_modelled(), *IGNORED_FIELDS, *RULES, *ALIAS_FIELDS})


def _unknown(key: str) -> str:
    """What to say of an unknown field: the nearest known name (a modelled one first)."""
    near = (difflib.get_close_matches(key, _modelled(), n=1)
            or difflib.get_close_matches(key, _known(), n=1))
    if near:
        return f"unknown field; did you mean {near[0]}?"
    return "unknown field; expected one of: " + ", ".join(_modelled())


def _check_fields(data: dict[str, Any], model: str, overridden: Collection[str]
                  ) -> dict[str, Any]:
    """The modelled fields of raw config `data` (from `model`, with `overridden` keys set by
    --model-set); UserError for any field whose meaning would be lost."""

    def where(key: str) -> str:
        return f"--model-set {key}" if key in overridden else f"{model}: {key}"

    kind = data.get("model_type")
    if kind not in IMPLEMENTED:
        from workloads.hf_config import HF_TASKS

        got = "is missing" if kind is None else f"{_shown(kind)!r} is not implemented"
        kinds = sorted({*IMPLEMENTED, *HF_TASKS})
        raise UserError(where("model_type") if "model_type" in overridden else model,
                        f"model_type {got}; expected one of {', '.join(kinds)}"
                        + _near(str(kind), kinds))
    for key, value in data.items():
        if key in RULES and (problem := RULES[key](value, data)):
            raise UserError(where(key), problem)
    known = _known()
    for key in data:
        if str(key) not in known:
            raise UserError(where(str(key)), _unknown(str(key)))
    return _aliased({k: v for k, v in data.items()
                     if k in ModelConfig.model_fields or k in ALIAS_FIELDS}, where)


def _aliased(data: dict[str, Any], where: Callable[[str], str]) -> dict[str, Any]:
    for alias, field in ALIAS_FIELDS.items():
        if alias not in data:
            continue
        value = data.pop(alias)
        if data.setdefault(field, value) != value:
            raise UserError(where(alias), f"is {_shown(value)} but {field} is "
                            f"{_shown(data[field])}; expected one value for both")
    return data


def model_names() -> list[str]:
    """Every model name --model takes (besides aliases, HF ids and paths): the paper presets,
    the catalog in its index's order, then the tiny test models."""
    own = [name for name in PRESETS if name not in catalog()]
    tiny = [name for name in own if name.startswith("tiny")]
    return [*(name for name in own if name not in tiny), *catalog(), *MODULE_PRESETS, *tiny]


def _near(word: str, choices: list[str]) -> str:
    """"; did you mean …?" with the nearest of `choices` (compared in lower case), or ""."""
    spelt = {choice.lower(): choice for choice in choices}
    near = difflib.get_close_matches(word.lower(), list(spelt), n=3)
    return f"; did you mean {' or '.join(spelt[n] for n in near)}?" if near else ""


def _lookup(model: str) -> tuple[dict[str, Any], str]:
    """The raw config `model` names and the name results show: a preset or catalog name,
    an alias, a config file, a folder holding config.json, or a catalog entry's HF id."""
    name = ALIASES.get(model.lower(), model.lower())
    path = Path(model)
    if name in PRESETS:
        return dict(PRESETS[name]), name
    if name in catalog():
        return catalog()[name].data(), name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(model, "is a folder without a config.json; expected an HF "
                            "config.json/YAML file or the folder of a checkpoint holding one")
        return _read_file(path / "config.json"), path.name
    if path.suffix in {".json", ".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise UserError(model, "model config file not found")
        return _read_file(path), path.stem
    ids = [entry.hf_id for entry in catalog().values() if entry.hf_id]
    by_id = {entry.hf_id.lower(): entry for entry in catalog().values() if entry.hf_id}
    if model.lower() in by_id:
        entry = by_id[model.lower()]
        return entry.data(), entry.name
    if "/" in model:
        raise UserError("--model", f"'{model}' is neither a file nor an HF id in the model "
                        "catalog, and nothing is downloaded; expected the path to its "
                        f"config.json (from https://huggingface.co/{model}) or a catalog id "
                        "(simulate list)" + _near(model, ids))
    near = _near(name, [*model_names(), *ALIASES])
    raise UserError("--model", f"unknown model '{model}'" + (near or (
        "; expected a config path, an HF id of the catalog or one of: "
        + ", ".join([*model_names(), *ALIASES]))))


#: Presets that are `python:` factories (our own nn.Modules without an HF config).
MODULE_PRESETS = {"resnet50": "python:workloads.resnet:resnet50"}


def resolve_model(model: str, overrides: Mapping[str, str] | None = None,
                  routing: str | None = None) -> AnyModel:
    """A preset or catalog name, bare size, a catalog entry's HF id (any case), the path to
    an HF config.json/YAML (or a folder holding config.json), or `python:module:factory`,
    with KEY=VALUE overrides; `routing` is an MoE model's --moe-routing policy.

    Returns a ModelConfig (llama, hgrn_bit: our modules), an HFConfig (architectures
    transformers builds) or a ModuleModel (`python:`), see `workloads.models`."""
    from workloads.hf_config import HF_TASKS, resolve_hf
    from workloads.models import PREFIX, resolve_module

    overrides = overrides or {}
    spec = MODULE_PRESETS.get(model.lower(), model)
    if spec.startswith(PREFIX):
        for flag, given in (("--model-set", overrides), ("--moe-routing", routing)):
            if given:
                raise UserError(flag, f"{model} is an nn.Module without a config; expected "
                                "the flag left out")
        found = resolve_module(spec)
        return found if spec == model else found.model_copy(update={"name": model.lower()})
    data, shown = _lookup(model)
    for key, text in overrides.items():
        data[key] = _coerce(key, text)
    shown += "".join(f" {k}={v}" for k, v in overrides.items())
    if data.get("model_type") in HF_TASKS and data.get("model_type") not in IMPLEMENTED:
        return resolve_hf(data, model, set(overrides), shown, routing)
    if routing is not None:
        raise UserError("--moe-routing", f"{shown} has no experts; expected the flag left out")
    data = _check_fields(data, model, overrides)
    data["name"] = shown
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        field, message = _problem(exc.errors()[0])
        base = field.split("[")[0].split(".")[0]
        where = f"--model-set {field}" if base in overrides else f"{model}: {field}"
        raise UserError(where, message) from None


def _problem(error: Mapping[str, Any]) -> tuple[str, str]:
    """(field, with any list index as [i], and message) of a pydantic error."""
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, FieldProblem):
        return cause.field, cause.message
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    return field.lstrip(".") or "config", str(error["msg"]).removeprefix("Value error, ")
