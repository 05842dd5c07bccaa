"""Build a model and the inputs of one step (imports torch; keep it out of light paths)."""

from __future__ import annotations

import torch
from torch import nn

from workloads.config import ModelConfig
from workloads.state import State


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    """Instantiate the model of `cfg` on `device` (meta: no memory, no weights)."""
    from workloads.hgrn_bit import HGRNBitForCausalLM
    from workloads.llama import LlamaForCausalLM

    cls = HGRNBitForCausalLM if cfg.model_type == "hgrn_bit" else LlamaForCausalLM
    with torch.device(device):
        return cls(cfg).eval()


def make_inputs(cfg: ModelConfig, batch: int, tokens: int, position: int,
                device: str | torch.device = "meta") -> tuple[torch.Tensor, State]:
    """Token ids (batch, tokens) and the state of a step that starts at `position`."""
    dtype = getattr(torch, cfg.torch_dtype)
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    state = State(position=position)
    if cfg.model_type == "hgrn_bit":
        state.recurrent = [torch.zeros(batch, cfg.hidden_size, dtype=torch.float32, device=device)
                           for _ in range(cfg.depth)]
    else:  # one KV cache per kept block, as wide as its KV heads
        shapes = [(batch, cfg.layer(i).kv_heads, position + tokens, cfg.head_dim)
                  for i in cfg.layer_ids]
        state.keys = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        state.values = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
    return ids, state
