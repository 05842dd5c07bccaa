"""Model configurations: HF-style fields, presets for the paper sizes, files and overrides."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from simulator.errors import UserError

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}


def glu_size(hidden: int) -> int:
    """The HGRN-Bit/fla rule for a null intermediate size: 256 · ⌈⌊8d/3⌋ / 256⌉."""
    return 256 * math.ceil(int(hidden * 4 * 2 / 3) / 256)


class ModelConfig(BaseModel):
    """The fields of an HF `config.json` that decide a model's shape and cost."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model_type: Literal["llama", "hgrn_bit"]
    hidden_size: int = Field(ge=1, le=1 << 17)
    intermediate_size: int | None = Field(default=None, ge=1, le=1 << 19)
    num_hidden_layers: int = Field(ge=1, le=1024)
    num_attention_heads: int = Field(default=1, ge=1, le=4096)
    num_key_value_heads: int | None = Field(default=None, ge=1, le=4096)
    vocab_size: int = Field(ge=1, le=1 << 22)
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    tie_word_embeddings: bool = False
    name: str = ""

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.model_type == "llama":
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("hidden_size must be a multiple of num_attention_heads")
            if self.num_attention_heads % self.kv_heads:
                raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or glu_size(self.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.torch_dtype]

    def key(self) -> str:
        """A stable text key of every field (for caches)."""
        return json.dumps(self.model_dump(), sort_keys=True)


def _mmfree(hidden: int, layers: int, inter: int | None = None) -> dict[str, Any]:
    return {"model_type": "hgrn_bit", "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": inter, "num_attention_heads": 1, "vocab_size": 32000}


def _llama(hidden: int, layers: int, heads: int, inter: int | None = None) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads,
            "intermediate_size": inter, "vocab_size": 32000}


# MatMul-free (HGRN-Bit) sizes: ../shared/reference/matmulfree.md §5.1 (Table 1, HF configs);
# 13B is not published: Llama-2 13B's shape (d = 5120, L = 40), as the paper compares at 13B.
# Transformer++ shares (L, d) with them (paper Table 1); heads follow flash-linear-attention's
# default of 16 up to 1.3B and a head dim of 128 beyond (assumption: not in the paper).
PRESETS: dict[str, dict[str, Any]] = {
    "mmfree-370m": _mmfree(1024, 24),
    "mmfree-1.3b": _mmfree(2048, 24, 5632),
    "mmfree-2.7b": _mmfree(2560, 32),
    "mmfree-13b": _mmfree(5120, 40),
    "transformerpp-370m": _llama(1024, 24, 16),
    "transformerpp-1.3b": _llama(2048, 24, 16),
    "transformerpp-2.7b": _llama(2560, 32, 20),
    "transformerpp-13b": _llama(5120, 40, 40),
    # Llama-2 (Touvron et al. 2023, HF meta-llama/Llama-2-*-hf config.json)
    "llama2-7b": _llama(4096, 32, 32, 11008),
    "llama2-13b": _llama(5120, 40, 40, 13824),
    # A tiny model for functional checks and fast tests.
    "tiny": _mmfree(64, 2, 192) | {"vocab_size": 256},
    "tiny-llama": _llama(64, 2, 4, 192) | {"vocab_size": 256, "num_key_value_heads": 2},
}
ALIASES = {"370m": "mmfree-370m", "1.3b": "mmfree-1.3b", "2.7b": "mmfree-2.7b",
           "13b": "mmfree-13b"}


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(str(path), f"cannot be read as a UTF-8 model config ({exc})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UserError(str(path), f"is not valid JSON/YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(str(path), "expected a mapping of HF config fields")
    if data.get("model_type") == "hgrn_bit" and "num_heads" in data:
        data.setdefault("num_attention_heads", data["num_heads"])
    return data


def _coerce(key: str, text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else None
    if key in ModelConfig.model_fields:
        return value
    raise UserError(f"--model-set {key}", "unknown field; expected one of: "
                    + ", ".join(sorted(f for f in ModelConfig.model_fields if f != "name")))


def resolve_model(model: str, overrides: Mapping[str, str] | None = None) -> ModelConfig:
    """A preset name, bare size or path to an HF config.json/YAML, with KEY=VALUE overrides."""
    name = ALIASES.get(model.lower(), model.lower())
    path = Path(model)
    if name in PRESETS:
        data, shown = dict(PRESETS[name]), name
    elif path.suffix in {".json", ".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise UserError(model, "model config file not found")
        data, shown = _read_file(path), path.stem
    else:
        raise UserError("--model", f"unknown model '{model}'; expected a config path or one of: "
                        + ", ".join([*ALIASES, *PRESETS]))
    for key, text in (overrides or {}).items():
        data[key] = _coerce(key, text)
    data["name"] = shown + "".join(f" {k}={v}" for k, v in (overrides or {}).items())
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or "config"
        where = f"--model-set {field}" if field in (overrides or {}) else f"{model}: {field}"
        raise UserError(where, error["msg"].removeprefix("Value error, ")) from None
