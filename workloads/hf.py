"""Hugging Face models on the meta device: transformers builds the architecture from its
config (never from a checkpoint: nothing is downloaded) with our attention and experts
functions registered, so the trace sees:

- attention as one `mmsim::attention` op (causal, sliding window, grouped KV heads): the
  mapping decides per machine whether it runs fused (FlashAttention-2) or not;
- MoE experts as one GEMM chain per active expert with its token count from the routing
  policy (`workloads.routing`): a meta router has no values to route by;
- the KV cache as transformers' StaticCache, allocated before the step and carrying the
  state role, a sliding-window layer's as long as its window (new entries are state writes).
  The cache is told it holds `context` tokens but its layers start empty, so a full window
  takes its new entry by index (as a ring buffer would), not by transformers' roll and copy
  of the whole window;
- an RMSNorm module as one norm op (a fused kernel), as LayerNorm is in aten.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from simulator.errors import UserError
from workloads import ops
from workloads.build import Step, step_tokens
from workloads.hf_config import HFConfig, experts_per_token, moe_layers

IMPLEMENTATION = "mmsim"
#: The attribute an experts module carries its routing in: (config, MoE block number,
#: top-k, the list its counts are appended to).
ROUTE = "_mmsim_route"


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
               sliding_window: int | None = None, is_causal: bool | None = None,
               **_: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (B, H, S, D) in, (B, S, H, D) out."""
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    causal = causal and query.shape[2] > 1  # one new token sees every cached key
    window = sliding_window if causal and sliding_window and sliding_window < key.shape[2] else 0
    out = ops.attention(query, key, value, causal, int(window))
    return out.transpose(1, 2).contiguous(), None


def _experts(self: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface: each active expert's GEMMs on its routed tokens."""
    cfg, block, top_k, used = getattr(self, ROUTE)
    counts = cfg.routing.counts(block, hidden.shape[0], self.num_experts, top_k)
    used.append(counts)
    out = torch.zeros_like(hidden)
    for expert, tokens in enumerate(counts):
        if not tokens:
            continue
        rows = torch.zeros(tokens, dtype=torch.long, device=hidden.device)
        x = hidden.index_select(0, rows)
        x = self._apply_gate(F.linear(x, self.gate_up_proj[expert]))
        x = F.linear(x, self.down_proj[expert]) * top_k_weights.new_empty(tokens, 1)
        out.index_add_(0, rows, x.to(out.dtype))
    return out


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    AttentionInterface.register(IMPLEMENTATION, _attention)
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _experts)


def hf_config(cfg: HFConfig) -> Any:
    """The transformers config object of `cfg` (UserError where transformers refuses it)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in cfg.fields.items() if k not in {"model_type", "torch_dtype",
                                                                 "dtype"}}
    with _refused(cfg, "configure"):
        config = AutoConfig.for_model(cfg.model_type, **fields)
    config._attn_implementation = IMPLEMENTATION
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = IMPLEMENTATION
    return config


def build_hf(cfg: HFConfig) -> nn.Module:
    """The model of `cfg` on meta, in its dtype, in eval mode (transformers' advice about
    generation settings, e.g. a pad token id, is not printed: it changes no cost)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification
    from transformers.utils import logging

    _register()
    auto = {"causal": AutoModelForCausalLM, "vision": AutoModelForImageClassification,
            "clip": AutoModel}[cfg.task]
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with torch.device("meta"), _refused(cfg, "build"):
            model = auto.from_config(hf_config(cfg), attn_implementation=IMPLEMENTATION,
                                     dtype=getattr(torch, cfg.torch_dtype))
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()


@contextmanager
def _refused(cfg: HFConfig, what: str) -> Iterator[None]:
    """transformers' own refusal of a config (sizes that do not fit together) as one line."""
    try:
        yield
    except Exception as exc:  # transformers raises many types (its dataclass checks among them)
        if isinstance(exc, UserError):
            raise
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()),
                     type(exc).__name__)
        raise UserError(cfg.name, f"transformers cannot {what} it on meta ({first}); "
                        "expected a config it accepts (sizes that fit together, known "
                        "activations)") from None


def _leaves(model: nn.Module) -> frozenset[str]:
    """transformers' RMSNorm modules (several aten ops each; one fused kernel on a device)."""
    return frozenset(path for path, module in model.named_modules()
                     if type(module).__name__.endswith("RMSNorm")
                     and type(module).__module__.startswith("transformers."))


def _route(cfg: HFConfig, model: nn.Module) -> list[list[int]]:
    """Bind each experts module to its MoE block number; returns the counts list it fills."""
    used: list[list[int]] = []
    blocks = moe_layers(cfg)
    experts = [m for path, m in model.named_modules() if path.endswith(".experts")
               and hasattr(m, "gate_up_proj")]
    if len(experts) != len(blocks):
        raise UserError(cfg.name, f"found {len(experts)} experts modules for {len(blocks)} "
                        "MoE blocks; this MoE layout is not modelled")
    if experts:
        cfg.routing.check(len(blocks), experts[0].num_experts)
    for number, module in enumerate(experts):
        if module.has_bias or module.is_transposed or not module.is_concatenated:
            raise UserError(cfg.name, "experts with biases or transposed weights are not "
                            "modelled")
        setattr(module, ROUTE, (cfg, number, experts_per_token(cfg), used))
    return used


def _cache(model: nn.Module, batch: int, length: int, seen: int, dtype: torch.dtype) -> Any:
    """A StaticCache of `length` positions, allocated now (its tensors are the state), that
    says it holds `seen` tokens (a meta cache cannot count them)."""
    from transformers import StaticCache

    config = model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    cache = StaticCache(config=config, max_cache_len=length)
    cache.early_initialization(batch, kv, head_dim, dtype, torch.device("meta"))
    cache.get_seq_length = lambda *_: seen
    return cache


def hf_step(cfg: HFConfig, phase: str, batch: int, context: int, prompt: int) -> Step:
    """One step of an HF model: decode or prefill with a static KV cache (causal LMs), or a
    forward pass over `batch` images (ViT) or images and their captions (CLIP)."""
    model = build_hf(cfg)
    dtype = getattr(torch, cfg.torch_dtype)
    meta = torch.device("meta")
    leaves = _leaves(model)

    def call(**inputs: Any) -> None:
        with _refused(cfg, "run"):
            model(**inputs)

    if cfg.task != "causal":
        vision = cfg.vision
        size, channels = vision["image_size"], vision["num_channels"]
        inputs = {"pixel_values": torch.zeros(batch, channels, size, size, dtype=dtype,
                                              device=meta)}
        if cfg.task == "clip":
            length = cfg.config["text_config"]["max_position_embeddings"]
            inputs["input_ids"] = torch.zeros(batch, length, dtype=torch.long, device=meta)
        return Step(model, lambda: call(**inputs), [], batch, leaves)
    tokens, position = step_tokens(phase, context, prompt)
    with _refused(cfg, "allocate the KV cache of"):
        cache = _cache(model, batch, position + tokens, position, dtype)
    used = _route(cfg, model)
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=meta)
    positions = torch.arange(position, position + tokens, device=meta).expand(batch, tokens)
    state = [t for layer in cache.layers for t in (layer.keys, layer.values)]

    def run() -> None:
        used.clear()
        call(input_ids=ids, position_ids=positions, cache=cache, use_cache=True)

    return Step(model, run, state, batch * tokens, leaves, used)
