"""Low-rank adapters on a model's linears: LoRA (Hu et al., arXiv 2106.09685) and
Block-LoRA's shared down-projection.

`--lora rank=R,modules=q,v[,shared_down=true][,blocks=N]`: every linear whose name is one
of `modules` (q, k, v, o, gate, up, down as their `_proj` names, or a module's own name such
as c_attn) gets y = W x + B (A x) · scale, with A (R × in) and B (out × R) trainable and
every weight of the base frozen (no gradient, no optimizer state). `shared_down`
(Block-LoRA): A is cut along its input into `blocks` sub-matrices that are all one shared
R × in/blocks matrix, so A x = A_s (Σᵢ xᵢ): the sum of the input's blocks (an addition)
replaces most of the down-projection's multiply. `blocks` defaults to 4 (an assumption:
the paper's count is not given here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from simulator.errors import UserError

FLAG = "--lora"
_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
            "up": "up_proj", "down": "down_proj"}
DEFAULT_BLOCKS = 4


@dataclass(frozen=True)
class Lora:
    """Adapters of rank `rank` on the linears named `modules`."""

    rank: int
    modules: tuple[str, ...]
    shared_down: bool = False
    blocks: int = DEFAULT_BLOCKS

    def key(self) -> str:
        return (f"lora/{self.rank}/{','.join(self.modules)}/"
                f"{self.blocks if self.shared_down else 0}")


def parse_lora(text: str) -> Lora:
    """`rank=R,modules=q,v[,shared_down=true][,blocks=N]` (bare words after modules= are
    more modules)."""
    fields: dict[str, list[str]] = {}
    current = None
    for token in (t.strip() for t in text.split(",")):
        key, sep, value = token.partition("=")
        if sep:
            current = key.strip()
            if current not in ("rank", "modules", "shared_down", "blocks"):
                raise UserError(FLAG, f"unknown field {current!r}; expected rank, modules, "
                                "shared_down or blocks")
            fields[current] = [value.strip()]
        elif current == "modules" and token:
            fields["modules"].append(token)
        else:
            raise UserError(FLAG, f"expected rank=R,modules=q,v[,shared_down=true], not {text!r}")
    try:
        rank = int(fields.get("rank", [""])[0])
        blocks = int(fields.get("blocks", [str(DEFAULT_BLOCKS)])[0])
    except ValueError:
        raise UserError(FLAG, f"expected whole numbers for rank and blocks, not {text!r}") from None
    shared = fields.get("shared_down", ["false"])[0].lower()
    if shared not in ("true", "false"):
        raise UserError(FLAG, f"shared_down: expected true or false, not {shared!r}")
    modules = tuple(m for m in fields.get("modules", []) if m)
    if not 1 <= rank <= 65536 or not modules or not 1 <= blocks <= 4096:
        raise UserError(FLAG, f"expected a rank ≥ 1, at least one module and blocks ≥ 1, not "
                        f"{text!r}")
    return Lora(rank, modules, shared == "true", blocks)


def _targets(model: nn.Module, lora: Lora) -> list[tuple[str, nn.Module]]:
    names = {_ALIASES.get(m, m) for m in lora.modules}
    found = [(path, module) for path, module in model.named_modules()
             if path.rpartition(".")[2] in names and isinstance(getattr(module, "weight", None),
                                                                 nn.Parameter)]
    if not found:
        raise UserError(FLAG, f"no linear named {', '.join(sorted(names))} in the model; "
                        "expected names such as q, v (q_proj, v_proj) or c_attn")
    return found


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear (nn.Linear's weight is out × in; GPT-2's Conv1D's in × out)."""
    rows, cols = module.weight.shape
    return (rows, cols) if type(module).__name__ == "Conv1D" else (cols, rows)


def apply_lora(model: nn.Module, lora: Lora) -> None:
    """Freeze every parameter of `model` and add trainable adapters to the target linears."""
    for param in model.parameters():
        param.requires_grad_(False)
    shared: dict[int, nn.Parameter] = {}
    for _path, module in _targets(model, lora):
        width, out = _features(module)
        dtype = module.weight.dtype
        if lora.shared_down:
            if width % lora.blocks:
                raise UserError(FLAG, f"blocks={lora.blocks} must divide the input width "
                                f"{width}")
            part = width // lora.blocks
            if part not in shared:
                shared[part] = nn.Parameter(torch.empty(lora.rank, part, dtype=dtype,
                                                        device="meta"))
            module.lora_down = shared[part]  # one matrix, registered on every adapted linear
        else:
            module.lora_down = nn.Parameter(torch.empty(lora.rank, width, dtype=dtype,
                                                        device="meta"))
        module.lora_up = nn.Parameter(torch.empty(out, lora.rank, dtype=dtype, device="meta"))
        module.forward = _adapted(module, module.forward, lora)  # type: ignore[method-assign]


def _adapted(module: nn.Module, forward: Any, lora: Lora) -> Any:
    blocks = lora.blocks if lora.shared_down else 1
    scale = 1.0 / lora.rank

    def run(x: torch.Tensor) -> torch.Tensor:
        down = x
        if blocks > 1:  # Block-LoRA: Σᵢ xᵢ over the input's blocks, then the shared A_s
            down = x.unflatten(-1, (blocks, x.shape[-1] // blocks)).sum(-2)
        low = torch.nn.functional.linear(down, module.lora_down)
        return forward(x) + torch.nn.functional.linear(low, module.lora_up) * scale

    return run
