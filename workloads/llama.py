"""Transformer++ (Llama-2 architecture): RMSNorm, RoPE, grouped KV heads, SwiGLU.

Each block takes its own widths from the config (`ModelConfig.layer`: per-layer heads, KV
heads and intermediate size, as structured compression leaves them) and only the kept blocks
are built, each named by its original layer number (layers.0, layers.2, …).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from workloads import ops
from workloads.config import ModelConfig
from workloads.norm import RMSNorm
from workloads.state import State


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Original layer `layer`'s attention; `slot` is its KV cache in the step's State (a
    State without caches: attention over the step's own keys, as in training)."""

    def __init__(self, cfg: ModelConfig, layer: int, slot: int, dtype: torch.dtype) -> None:
        super().__init__()
        d, hd, shape = cfg.hidden_size, int(cfg.head_dim or 0), cfg.layer(layer)
        self.slot, self.heads, self.kv_heads, self.head_dim = (
            slot, shape.heads, shape.kv_heads, hd)
        self.q_proj = nn.Linear(d, self.heads * hd, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False, dtype=dtype)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        positions = torch.arange(state.position, state.position + t, device=x.device)
        angles = torch.outer(positions.float(), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if state.keys:  # the step's keys and values join the cache
            keys, values = state.keys[self.slot], state.values[self.slot]
            end = state.position + t
            keys[:, :, state.position:end].copy_(k)
            values[:, :, state.position:end].copy_(v)
            k, v = keys[:, :, :end], values[:, :, :end]
        out = ops.attention(q, k, v, t > 1)  # no cache (a training step): its own keys
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d: int, i: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, i, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(d, i, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(i, d, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, slot: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, layer, slot, dtype)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.layer(layer).ffn_size, dtype)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), state)
        return x + self.mlp(self.mlp_norm(x))


class Blocks(nn.Module):
    """The kept blocks in order, each named (and indexed: `blocks[2]`) by its original layer
    number, so module paths read layers.0, layers.2, … after removed blocks."""

    def __init__(self, blocks: Mapping[int, nn.Module]) -> None:
        super().__init__()
        for index, block in blocks.items():
            self.add_module(str(index), block)

    def __getitem__(self, index: int) -> nn.Module:
        return self.get_submodule(str(index))

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.children())

    def __len__(self) -> int:
        return len(self._modules)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dtype = getattr(torch, cfg.torch_dtype)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = Blocks({layer: LlamaBlock(cfg, layer, slot, dtype)
                              for slot, layer in enumerate(cfg.layer_ids)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, state: State) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, state)
        return self.lm_head(self.norm(x))
