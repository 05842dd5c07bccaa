"""Hugging Face architectures built by transformers: their configs, checked without importing
transformers, and closed-form shapes and parameter counts (`simulate list`, the tests).

A config's field names are checked against `hf_fields.json` (what the pinned transformers'
config class of that model_type takes, see `workloads.hf_schema`), its modelled fields' values
here; transformers builds the model (`workloads.hf`).
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from simulator.errors import UserError
from workloads.config import DTYPES, check_phase
from workloads.routing import Routing

#: model_type → what one step of it is: a causal LM (decode, prefill), a vision encoder
#: (a forward pass over images) or CLIP (images and their captions, one forward pass).
HF_TASKS: dict[str, Literal["causal", "vision", "clip"]] = {
    "llama": "causal", "mistral": "causal", "mixtral": "causal", "qwen2": "causal",
    "qwen2_moe": "causal", "gemma2": "causal", "phi3": "causal", "gpt2": "causal",
    "gptj": "causal", "opt": "causal", "vit": "vision", "clip": "clip"}
#: Fields of published configs that transformers' config classes do not declare, accepted
#: with why: most cannot change the cost; num_labels and projection_dim size heads (the
#: closed form reads them).
GENERAL_FIELDS: dict[str, str] = {
    "_name_or_path": "where the checkpoint was saved from",
    "transformers_version": "the library version that wrote the file",
    "architectures": "the HF class name; model_type chooses the class",
    "torch_dtype": "the weights' dtype (read as dtype)",
    "dtype": "the weights' dtype",
    "rope_theta": "a RoPE frequency (transformers folds it into rope_parameters)",
    "rope_scaling": "RoPE frequency scaling: changes the angles, not the work",
    "task_specific_params": "generate() settings",
    "use_cache": "a generate() switch; a simulated decode step always keeps its KV cache",
    "n_ctx": "GPT-2's old name of n_positions (must equal it)",
    "_remove_final_layer_norm": "an OPT conversion flag (OPT-350m only)",
    "max_sequence_length": "a conversion field transformers never reads",
    "projection_dim": "CLIP's shared embedding width",
    "initializer_factor": "weight initialisation for training",
    "logit_scale_init_value": "a trained scalar's initial value",
    "num_labels": "a classifier's classes (transformers sizes its head by them)",
    "cache_implementation": "a generate() setting",
    "sliding_window_size": "Gemma-2's old copy of sliding_window",
    "hidden_act": "Gemma's old activation name (transformers reads hidden_activation)",
    "auto_map": "the HF remote-code classes; model_type chooses the class",
    "attention_bias": "must be false where the class has no such field (Phi-3)",
    "n_special": "GPT-2's special-token count (no weights)",
    "predict_special_tokens": "a GPT-2 training switch",
    "output_past": "an old generate() switch",
    "gradient_checkpointing": "a training switch",
    "rotary": "GPT-J's old flag (it always uses RoPE)",
    "scale_attn_weights": "a scale inside attention",
    "summary_type": "a sequence-summary head for fine-tuning (not built)",
    "summary_use_proj": "as summary_type",
    "summary_activation": "as summary_type",
    "summary_proj_to_labels": "as summary_type",
    "summary_first_dropout": "as summary_type",
    "tokenizer_class": "a tokenizer",
    "activation_dropout": "dropout is off at inference",
    "dropout": "dropout is off at inference",
    "prefix": "a generate() prompt prefix",
    "output_attentions": "returns attention maps (a debugging output)",
    "model_type": "a sub-config's class name (the top-level one chooses the architecture)",
}


@cache
def _schema() -> dict[str, Any]:
    path = Path(__file__).resolve().parent / "hf_fields.json"
    return json.loads(path.read_text(encoding="utf-8"))["models"]


class Shape(NamedTuple):
    """A model's sizes, as `simulate list` shows them."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    experts: int
    context: int | None
    vocab: int
    tied: bool


def merged(schema: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The config's fields over its class's defaults, aliases under their own names."""
    out = dict(schema["defaults"])
    for key, value in fields.items():
        name = schema["aliases"].get(key, key)
        if name in schema["sub_configs"] and isinstance(value, dict):
            value = merged(schema["sub_configs"][name], value)
        out[name] = value
    for name, sub in schema["sub_configs"].items():
        out.setdefault(name, merged(sub, {}))
    return out


def check_names(model: str, model_type: str, fields: dict[str, Any]) -> None:
    """UserError for a field the config class of `model_type` (or a sub-config of it) does
    not take, with the nearest name it does."""
    _check_names(model, model_type, _schema()[model_type], fields, "")


#: Example values of the general fields that size the model (their type is checked).
LEGACY_TYPES: dict[str, Any] = {"rope_theta": 10000.0, "n_ctx": 1024, "sliding_window_size": 1,
                                "rope_scaling": {}, "num_labels": 2, "id2label": {},
                                "label2id": {}}
#: Values of fields transformers takes that a step here cannot model (the only one allowed).
NOT_MODELLED: dict[str, tuple[Any, str]] = {
    "add_cross_attention": (False, "cross-attention to an encoder's states (a decoder-only "
                                   "step has none)"),
}
#: Sizes with a class default that null turns off rather than leaves unset.
NULLABLE = {"sliding_window", "max_window_layers", "rotary_dim"}
#: Sizes whose class default is null (unset), positive when given.
#: Fields declared None whose value, when given, is a list (of layer indices).
_OPTIONAL_LISTS = {"mlp_only_layers", "layer_types"}
_OPTIONAL_SIZES = {"sliding_window", "head_dim", "num_key_value_heads", "n_inner",
                   "intermediate_size", "rotary_dim", "word_embed_proj_dim",
                   "max_window_layers", "num_experts", "num_local_experts"}


def _check_value(model: str, key: str, value: Any, default: Any) -> None:
    """A value of the type its class default has (sizes positive), so that transformers
    builds what the config says rather than failing inside."""
    where = f"{model}: {key}"
    if key.endswith(("_token_id", "_token_ids")):
        return
    if value is None:
        if isinstance(default, int) and not isinstance(default, bool) and key not in NULLABLE:
            raise UserError(where, f"expected a whole number like {default}, not null")
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(where, f"expected true or false, not {value!r}")
    elif isinstance(default, int) or (default is None and key in _OPTIONAL_SIZES):
        low = 1 if default is None or default >= 1 else 0
        if not (number and isinstance(value, int)) or value < low:
            raise UserError(where, f"expected a whole number ≥ {low}, not {value!r}")
    elif isinstance(default, float):
        if not number or not math.isfinite(value):
            raise UserError(where, f"expected a number, not {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise UserError(where, f"expected a text value like {default!r}, not {value!r}")
    elif (isinstance(default, list) or key in _OPTIONAL_LISTS) and not isinstance(value, list):
        raise UserError(where, f"expected a list, not {value!r}")
    elif isinstance(default, dict) and not isinstance(value, dict):
        raise UserError(where, f"expected a mapping, not {value!r}")


def _check_names(model: str, model_type: str, schema: dict[str, Any], fields: dict[str, Any],
                 where: str) -> None:
    import difflib

    known = {*schema["defaults"], *schema["aliases"], *schema["sub_configs"], *GENERAL_FIELDS}
    for key, value in fields.items():
        if key == "attention_bias" and key not in schema["defaults"] and value:
            raise UserError(f"{model}: {where}{key}", f"a bias on {model_type}'s attention "
                            "projections is not modelled; expected false")
        if key in NOT_MODELLED and value != NOT_MODELLED[key][0]:
            allowed, what = NOT_MODELLED[key]
            raise UserError(f"{model}: {where}{key}", f"{what} is not modelled; expected "
                            f"{json.dumps(allowed)}")
        if key in schema["sub_configs"] and not isinstance(value, dict | None):
            raise UserError(f"{model}: {where}{key}", f"expected a mapping of "
                            f"{key.replace('_', ' ')} fields, not {value!r}")
        if key in schema["sub_configs"] and isinstance(value, dict):
            _check_names(model, model_type, schema["sub_configs"][key], value, f"{where}{key}.")
        elif key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise UserError(f"{model}: {where}{key}",
                            f"unknown field for model_type {model_type}{hint}")
        else:
            default = schema["defaults"].get(key)
            default = LEGACY_TYPES.get(key) if default is None else default
            _check_value(model, f"{where}{key}", value, default)


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _int(cfg: dict[str, Any], key: str, model: str, low: int = 1) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{model}: {key}", f"expected a whole number ≥ {low}, not {value!r}")
    return value


class HFConfig(BaseModel):
    """A model that transformers builds: its model_type, the fields of its config.json (as
    given), the dtype it runs at and, for MoE models, how tokens are routed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_type: str
    fields: dict[str, Any]
    #: transformers' default where the config names none
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    routing: Routing = Routing()
    name: str = ""

    @property
    def task(self) -> str:
        return HF_TASKS[self.model_type]

    @property
    def config(self) -> dict[str, Any]:
        """The fields over the config class's declared defaults (canonical names), with the
        sizes transformers derives where they are null: head_dim (hidden / heads),
        num_key_value_heads (the heads) and OPT's word_embed_proj_dim (hidden)."""
        out = merged(_schema()[self.model_type], self.fields)
        hidden, heads = out.get("hidden_size"), out.get("num_attention_heads")
        if _positive(hidden) and _positive(heads):
            if "head_dim" in out and out["head_dim"] is None:
                out["head_dim"] = hidden // heads
            if "num_key_value_heads" in out and out["num_key_value_heads"] is None:
                out["num_key_value_heads"] = heads
        if self.model_type == "opt" and out.get("word_embed_proj_dim") is None:
            out["word_embed_proj_dim"] = hidden
        return out

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.torch_dtype]

    def key(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)

    @property
    def shape(self) -> Shape:
        return shape_of(self)

    # The names `simulate list` and the reports read, as ModelConfig has them.
    @property
    def num_hidden_layers(self) -> int:
        return self.shape.layers

    @property
    def hidden_size(self) -> int:
        return self.shape.hidden

    @property
    def num_attention_heads(self) -> int:
        return self.shape.heads

    @property
    def kv_heads(self) -> int:
        return self.shape.kv_heads

    @property
    def experts(self) -> int:
        return self.shape.experts

    @property
    def vocab_size(self) -> int:
        return self.shape.vocab

    @property
    def tie_word_embeddings(self) -> bool:
        return self.shape.tied

    @property
    def vision(self) -> dict[str, Any]:
        """The vision tower's fields: CLIP's vision_config, a ViT's own (a vision task)."""
        return self.config["vision_config"] if self.task == "clip" else self.config

    @property
    def position_limit(self) -> int | None:
        return self.shape.context

    @property
    def param_count(self) -> int:
        return param_count(self)

    @property
    def phases(self) -> tuple[str, ...]:
        return ("decode", "prefill") if self.task == "causal" else ("forward",)

    def check_positions(self, phase: str, context: int, prompt: int) -> None:
        """Refuse a phase the model has not, or a step past its positions."""
        check_phase(self.name, phase, self.phases)
        limit = self.position_limit
        if phase == "forward" or limit is None:
            return
        flag, need = ("--context", context + 1) if phase == "decode" else ("--prompt", prompt)
        if need > limit:
            most = limit - 1 if phase == "decode" else limit
            raise UserError(flag, f"{need} positions are beyond {self.name}'s "
                            f"max_position_embeddings {limit}; expected at most {most}")


def _heads_divide(cfg: dict[str, Any], name: str, hidden: str, heads: str,
                  where: str = "") -> None:
    """Architectures without a head_dim field split hidden_size evenly over the heads."""
    if _int(cfg, hidden, name) % _int(cfg, heads, name):
        raise UserError(f"{name}: {where}{heads}", f"{cfg[heads]} heads do not divide "
                        f"{hidden} {cfg[hidden]}; expected a divisor of it")


def shape_of(model: HFConfig) -> Shape:
    """The sizes of `model`, from its fields (validated here: they size the closed form)."""
    cfg, name, kind = model.config, model.name or model.model_type, model.model_type
    if kind in {"gpt2", "gptj"}:
        _heads_divide(cfg, name, "n_embd", "n_head")
    elif kind in {"opt", "vit"}:
        _heads_divide(cfg, name, "hidden_size", "num_attention_heads")
    if kind == "clip":
        text, vision = cfg["text_config"], cfg["vision_config"]
        for tower, sub in (("text_config.", text), ("vision_config.", vision)):
            _heads_divide(sub, name, "hidden_size", "num_attention_heads", tower)
        return Shape(_int(text, "num_hidden_layers", name) + _int(vision, "num_hidden_layers",
                                                                    name),
                     _int(vision, "hidden_size", name), _int(vision, "num_attention_heads", name),
                     _int(vision, "num_attention_heads", name), 1,
                     _int(text, "max_position_embeddings", name), _int(text, "vocab_size", name),
                     False)
    if kind in {"gpt2", "gptj"}:
        layers, hidden, heads = (_int(cfg, "n_layer", name), _int(cfg, "n_embd", name),
                                 _int(cfg, "n_head", name))
        context = _int(cfg, "n_positions", name)
        if cfg.get("n_ctx", context) != context:
            raise UserError(f"{name}: n_ctx", f"is {cfg['n_ctx']} but n_positions is "
                            f"{context}; expected them equal")
        return Shape(layers, hidden, heads, heads, 1, context, _int(cfg, "vocab_size", name),
                     bool(cfg.get("tie_word_embeddings", True)))
    layers, hidden = _int(cfg, "num_hidden_layers", name), _int(cfg, "hidden_size", name)
    heads = _int(cfg, "num_attention_heads", name)
    if (cfg.get("head_dim") or hidden // heads) < 1:
        raise UserError(f"{name}: num_attention_heads", f"{heads} heads over hidden_size "
                        f"{hidden} leave no head size; expected at most {hidden} (or head_dim)")
    if kind == "vit":
        return Shape(layers, hidden, heads, heads, 1, None, 0, False)
    kv = cfg.get("num_key_value_heads") or heads
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 1
    return Shape(layers, hidden, heads, kv, experts,
                 _int(cfg, "max_position_embeddings", name), _int(cfg, "vocab_size", name),
                 bool(cfg.get("tie_word_embeddings")))


def _encoder_layer(d: int, inner: int, qkv_bias: bool = True, width: int | None = None) -> int:
    """A ViT/CLIP encoder block: q, k, v `width` wide (biased unless not), out with a bias, a
    2-matrix MLP, two LayerNorms."""
    a = width or d
    return 4 * d * a + (3 * a if qkv_bias else 0) + d + 2 * d * inner + inner + d + 4 * d


def _vision_tower(cfg: dict[str, Any], patch_bias: bool, own_head_dim: bool) -> int:
    """Patch and position embeddings and the encoder blocks; ViT sizes its attention by
    head_dim (`own_head_dim`), CLIP's vision tower by hidden_size whatever head_dim says."""
    d, p = cfg["hidden_size"], cfg["patch_size"]
    patches = (cfg["image_size"] // p) ** 2
    embed = cfg["num_channels"] * p * p * d + (d if patch_bias else 0) + d + (patches + 1) * d
    heads = cfg["num_attention_heads"]
    width = heads * (cfg.get("head_dim") or d // heads) if own_head_dim else d
    return embed + cfg["num_hidden_layers"] * _encoder_layer(
        d, cfg["intermediate_size"], bool(cfg.get("qkv_bias", True)), width)


def _decoder_params(cfg: dict[str, Any], kind: str) -> int:
    """Parameters of a Llama-like decoder (RMSNorm, RoPE, gated MLP or MoE)."""
    d, v, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    h = cfg["num_attention_heads"]
    kv, hd = cfg.get("num_key_value_heads") or h, cfg.get("head_dim") or d // h
    qkv_bias = (kind == "qwen2" or bool(cfg.get("qkv_bias")) if kind in {"qwen2", "qwen2_moe"}
                else bool(cfg.get("attention_bias")))
    attention = d * h * hd + 2 * d * kv * hd + h * hd * d
    attention += (h * hd + 2 * kv * hd) if qkv_bias else 0
    attention += d if cfg.get("attention_bias") else 0  # o_proj's (llama, gemma2)
    mlp_bias = 2 * cfg.get("intermediate_size", 0) + d if cfg.get("mlp_bias") else 0
    norms = (4 if kind == "gemma2" else 2) * d
    total = 0
    for layer in range(n):
        if kind == "mixtral":
            mlp = cfg["num_local_experts"] * (d + 3 * d * cfg["intermediate_size"])
        elif kind == "qwen2_moe" and _sparse(cfg, layer):
            mlp = (cfg["num_experts"] * (d + 3 * d * cfg["moe_intermediate_size"])
                   + 3 * d * cfg["shared_expert_intermediate_size"] + d)
        else:
            mlp = 3 * d * cfg["intermediate_size"] + mlp_bias
        total += attention + mlp + norms
    return total + v * d * (1 if cfg.get("tie_word_embeddings") else 2) + d


def _sparse(cfg: dict[str, Any], layer: int) -> bool:
    """qwen2_moe: whether block `layer` has experts (else a dense MLP)."""
    step = cfg.get("decoder_sparse_step") or 1
    return (cfg.get("num_experts") or 0) > 0 and layer not in (cfg.get("mlp_only_layers") or ()
                                                               ) and (layer + 1) % step == 0


def param_count(model: HFConfig) -> int:
    """Parameters of the whole model, closed form from its config (embeddings included,
    tied matrices once; buffers not counted)."""
    shape_of(model)  # the sizes it reads, validated
    cfg, kind = model.config, model.model_type
    if kind == "gpt2":
        d, inner = cfg["n_embd"], cfg.get("n_inner") or 4 * cfg["n_embd"]
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
        return (cfg["vocab_size"] + cfg["n_positions"]) * d + cfg["n_layer"] * block + 2 * d + (
            0 if cfg.get("tie_word_embeddings", True) else cfg["vocab_size"] * d)
    if kind == "gptj":
        d, inner, v = cfg["n_embd"], cfg.get("n_inner") or 4 * cfg["n_embd"], cfg["vocab_size"]
        block = 2 * d + 4 * d * d + (d * inner + inner) + (inner * d + d)
        head = v + (0 if cfg.get("tie_word_embeddings") else v * d)  # the bias is its own
        return v * d + cfg["n_layer"] * block + 2 * d + head
    if kind == "opt":
        d, v, ffn = cfg["hidden_size"], cfg["vocab_size"], cfg["ffn_dim"]
        proj = cfg.get("word_embed_proj_dim") or d
        bias = bool(cfg.get("enable_bias", True))
        norm = 2 * d if cfg.get("layer_norm_elementwise_affine", True) else 0
        block = 4 * (d * d + (d if bias else 0)) + 2 * norm + d * ffn + ffn * d + (
            ffn + d if bias else 0)
        final = norm if cfg.get("do_layer_norm_before", True) and not cfg.get(
            "_remove_final_layer_norm") else 0
        project = 2 * d * proj if proj != d else 0
        head = 0 if cfg.get("tie_word_embeddings", True) else v * proj
        return (v * proj + (cfg["max_position_embeddings"] + 2) * d + cfg["num_hidden_layers"]
                * block + final + project + head)
    if kind == "vit":
        d = cfg["hidden_size"]
        labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2
        return _vision_tower(cfg, True, True) + 2 * d + d * labels + labels
    if kind == "clip":
        text, vision = cfg["text_config"], cfg["vision_config"]
        dt, dv, proj = text["hidden_size"], vision["hidden_size"], cfg["projection_dim"]
        text_params = ((text["vocab_size"] + text["max_position_embeddings"]) * dt
                       + text["num_hidden_layers"] * _encoder_layer(dt, text["intermediate_size"])
                       + 2 * dt)
        vision_params = _vision_tower(vision, False, False) + 4 * dv  # pre- and post-LayerNorm
        return text_params + vision_params + dt * proj + dv * proj + 1
    return _decoder_params(cfg, kind)


def moe_layers(model: HFConfig) -> list[int]:
    """The blocks of `model` that route tokens to experts."""
    cfg = model.config
    if model.model_type == "mixtral":
        return list(range(cfg["num_hidden_layers"]))
    if model.model_type == "qwen2_moe":
        return [i for i in range(cfg["num_hidden_layers"]) if _sparse(cfg, i)]
    return []


def experts_per_token(model: HFConfig) -> int:
    return int(model.config.get("num_experts_per_tok") or 1)


def resolve_hf(data: dict[str, Any], model: str, overridden: set[str], name: str,
               routing: str | None) -> HFConfig:
    """An HFConfig from the raw fields `data` of `model` (`overridden` set by --model-set)."""
    from workloads.routing import parse_routing

    fields = dict(data)
    kind = fields.pop("model_type")
    dtypes = {fields.pop(key) for key in ("torch_dtype", "dtype") if key in fields}
    if len(dtypes) > 1:
        raise UserError(f"{model}: dtype", f"torch_dtype and dtype differ ({sorted(dtypes)}); "
                        "expected one value")
    dtype = dtypes.pop() if dtypes else "float32"  # transformers' default
    if dtype not in DTYPES:
        raise UserError(f"{model}: torch_dtype", f"expected one of {', '.join(DTYPES)}, "
                        f"not {dtype!r}")
    if fields.get("quantization_config") is not None:
        raise UserError(f"{model}: quantization_config",
                        "a quantised checkpoint is not modelled; expected it left out")
    fields.pop("quantization_config", None)
    try:
        check_names(model, kind, fields)
    except UserError as exc:
        key = exc.where.split(": ", 1)[-1].split(".")[0]
        if key in overridden:
            raise UserError(f"--model-set {key}", exc.message) from None
        raise
    cfg = HFConfig(model_type=kind, fields=fields, torch_dtype=dtype, name=name)
    param_count(cfg)  # validates the sizes the closed form reads
    if routing is not None:
        if not moe_layers(cfg):
            raise UserError("--moe-routing", f"{name} has no experts; expected the flag "
                            "left out")
        cfg = cfg.model_copy(update={"routing": parse_routing(routing),
                                     "name": f"{name} --moe-routing {routing}"})
    return cfg
