"""The MatMul-free LM (HGRN-Bit): MLGRU token mixer + BitLinear GLU channel mixer.

Follows the released code (../shared/reference/matmulfree.md §6): every BitLinear has its
own RMSNorm, int8 absmax activations per token, absmean ternary weights per tensor, and
the MLGRU output gate is RMSNorm(g) ⊙ SiLU(h).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workloads import ops
from workloads.config import ModelConfig
from workloads.norm import RMSNorm
from workloads.state import State


class BitLinear(nn.Module):
    """RMSNorm → int8 absmax quantisation → ternary matmul → dequantisation."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.in_features, self.out_features, self.eps = in_features, out_features, eps
        self.norm_weight = nn.Parameter(torch.ones(in_features, dtype=dtype))
        packed = torch.zeros(out_features, -(-in_features // ops.WEIGHTS_PER_BYTE),
                             dtype=torch.uint8)
        self.register_buffer("packed", packed)
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32))

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor) -> None:
        """Ternarise a float (out, in) weight with absmean scaling, as the model was trained."""
        scale = 1.0 / weight.abs().mean().clamp(min=1e-5)
        self.packed.copy_(ops.pack_ternary((weight * scale).round().clamp(-1, 1)))
        self.weight_scale.fill_(float(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = ops.rms_norm(x, self.norm_weight, self.eps)
        scale = 127.0 / u.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-5)
        q = (u.float() * scale).round().clamp(-128, 127).to(torch.int8)
        acc = ops.ternary_matmul(q, self.packed, self.in_features)
        return (acc.float() / scale / self.weight_scale).to(x.dtype)


class MLGRU(nn.Module):
    """h_t = f ⊙ h_{t−1} + SiLU(i) ⊙ (1 − f); o = BitLinear_o(RMSNorm(g) ⊙ SiLU(h))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.layer_idx = layer_idx
        self.i_proj = BitLinear(d, d, dtype)
        self.f_proj = BitLinear(d, d, dtype)
        self.g_proj = BitLinear(d, d, dtype)
        self.o_proj = BitLinear(d, d, dtype)
        self.g_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        # softmax(lower_bounds).cumsum − first term: weights only, precomputed (§6.2).
        self.register_buffer("lower_bound", torch.zeros(d, dtype=dtype))

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        i, f, g = self.i_proj(x), self.f_proj(x), self.g_proj(x)
        f = torch.sigmoid(f)
        if self.layer_idx > 0:
            f = self.lower_bound + (1 - self.lower_bound) * f
        c = F.silu(i) * (1 - f)
        h0 = state.recurrent[self.layer_idx]
        h, h_last = ops.hgrn_scan(f, c, h0)
        h0.copy_(h_last)
        return self.o_proj(self.g_norm(g) * F.silu(h))


class BitGLU(nn.Module):
    """gate ‖ up = BitLinear(d → 2I); down = BitLinear(I → d)(SiLU(gate) ⊙ up)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = BitLinear(cfg.hidden_size, 2 * cfg.ffn_size, dtype)
        self.down_proj = BitLinear(cfg.ffn_size, cfg.hidden_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class HGRNBitBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = MLGRU(cfg, layer_idx, dtype)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = BitGLU(cfg, dtype)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), state)
        return x + self.mlp(self.mlp_norm(x))


class HGRNBitForCausalLM(nn.Module):
    """Embedding (full precision) → L blocks → RMSNorm → ternary LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dtype = getattr(torch, cfg.torch_dtype)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(HGRNBitBlock(cfg, i, dtype)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = BitLinear(cfg.hidden_size, cfg.vocab_size, dtype)

    def forward(self, input_ids: torch.Tensor, state: State) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, state)
        return self.lm_head(self.norm(x))
