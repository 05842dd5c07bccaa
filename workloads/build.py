"""Build a model and the inputs of one step (imports torch; keep it out of light paths)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from simulator.errors import UserError
from workloads.config import ModelConfig
from workloads.hf_config import HFConfig
from workloads.models import AnyModel, ModuleModel
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


@dataclass
class Step:
    """One model step ready to run on meta: the module, a call that runs it, the state
    tensors it carries (KV caches, recurrent states), the tokens or items it produces and
    the module paths recorded as one norm op each."""

    model: nn.Module
    run: Callable[[], Any]
    state: list[torch.Tensor]
    tokens: int
    leaves: frozenset[str] = field(default_factory=frozenset)
    #: MoE models: tokens per expert in each MoE block, filled by the run.
    expert_tokens: list[list[int]] = field(default_factory=list)


def step_tokens(phase: str, context: int, prompt: int) -> tuple[int, int]:
    """(new tokens per sequence, the position they start at) of a decode or prefill step."""
    return (1, context) if phase == "decode" else (prompt, 0)


def prepare(cfg: AnyModel, phase: str, batch: int, context: int, prompt: int) -> Step:
    """The step of `cfg`: decode (one token after `context`), prefill (`prompt` tokens) or
    forward (an encoder's pass over `batch` inputs)."""
    if isinstance(cfg, HFConfig):
        from workloads.hf import hf_step

        return hf_step(cfg, phase, batch, context, prompt)
    if isinstance(cfg, ModuleModel):
        return module_step(cfg, batch)
    model = build_model(cfg)
    tokens, position = step_tokens(phase, context, prompt)
    ids, state = make_inputs(cfg, batch, tokens, position)
    return Step(model, lambda: model(ids, state), state.tensors(), batch * tokens)


def module_step(cfg: ModuleModel, batch: int) -> Step:
    """A `python:` factory's module and inputs, built on meta, as one forward pass."""
    where = f"python:{cfg.module}:{cfg.factory}"
    try:
        factory = getattr(importlib.import_module(cfg.module), cfg.factory)
    except Exception as exc:  # a user's module may fail in any way on import
        first = next(iter(str(exc).splitlines()), "")
        raise UserError("--model", f"{where} cannot be loaded ({type(exc).__name__}: "
                        f"{first})") from None
    if not callable(factory):
        raise UserError("--model", f"{where} is a {type(factory).__name__}; expected a "
                        "function returning (module, example_inputs)")
    try:
        takes_batch = "batch" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_batch = False
    if not takes_batch and batch != 1:
        raise UserError("--batch", f"{where} takes no batch keyword; expected 1")
    try:
        with torch.device("meta"):
            made = factory(batch=batch) if takes_batch else factory()
    except Exception as exc:  # the user's code
        first = next(iter(str(exc).splitlines()), "")
        raise UserError("--model", f"{where} failed on the meta device ({type(exc).__name__}: "
                        f"{first})") from None
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module)):
        raise UserError("--model", f"{where} returned {type(made).__name__}; expected "
                        "(module, example_inputs)")
    module, inputs = made
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    if len(tensors) != len(inputs) or any(t.device.type != "meta" for t in tensors):
        raise UserError("--model", f"{where}: expected example inputs that are tensors on the "
                        "meta device (built under the meta device the factory is called in)")
    module.eval()

    def run() -> None:
        try:
            module(*inputs)
        except UserError:
            raise
        except Exception as exc:  # the user's module
            first = next(iter(str(exc).splitlines()), "")
            raise UserError("--model", f"{where} failed to run its example inputs "
                            f"({type(exc).__name__}: {first})") from None

    items = tensors[0].shape[0] if tensors and tensors[0].dim() else 1
    return Step(module, run, [], int(items))
