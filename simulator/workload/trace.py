"""A Trace: the ops of one model step, with dependencies, bytes and operation counts.

A value (frozen dataclasses of plain types), saved and loaded as JSON without torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

OpKind = Literal["matmul", "ternary_matmul", "attention", "norm", "recurrence", "softmax",
                 "reduction", "activation", "elementwise", "embedding", "memory", "collective"]
Phase = Literal["decode", "prefill", "forward", "train"]
#: What part of a training step an op belongs to (simulator.workload.training): the
#: forward, the backward's activation-gradient and weight-gradient work, a recomputed
#: forward (activation checkpointing) or the optimizer; "" in an inference trace.
Stage = Literal["", "fwd", "bwd_act", "bwd_weight", "recompute", "optim"]
#: Op kinds that run on a matrix or ternary unit; all others run on a vector unit.
MATRIX_KINDS = frozenset({"matmul", "ternary_matmul", "attention"})
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Op:
    """One traced op.

    `ops`: operations (FLOPs for matmul/attention, add/sub per weight for ternary matmul,
    elements per pass for vector ops). Byte fields count what the op reads and writes:
    weights, state (KV cache/recurrent), activations in and out. `dims` holds the shape
    facts the mapping needs (m/n/k for matmuls; batch/heads/q_len/kv_len/head_dim for
    attention; numel/rows for vector ops). `deps` are the indices of producer ops.
    """

    index: int
    name: str
    fn: str
    kind: OpKind
    module: str
    layer: str
    dtype: str
    ops: int
    weight_bytes: int
    state_read_bytes: int
    state_write_bytes: int
    input_bytes: int
    output_bytes: int
    dims: dict[str, int]
    deps: tuple[int, ...]
    shapes: str
    #: matmuls: the dtype the weights are stored in, where it is not `dtype` (W4A16: int4)
    weight_dtype: str = ""
    #: training traces: the part of the step the op belongs to (see Stage)
    stage: Stage = ""

    def evolve(self, **changes: object) -> Op:
        """A copy with `changes` (dataclasses.replace without its per-call field walk: the
        trace splitters copy thousands of ops a step)."""
        if not changes.keys() <= _OP_FIELDS:
            raise TypeError(f"Op has no field(s) {sorted(changes.keys() - _OP_FIELDS)}")
        new = object.__new__(Op)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    @property
    def bytes(self) -> int:
        """All bytes the op moves, wherever they live."""
        return (self.weight_bytes + self.state_read_bytes + self.state_write_bytes
                + self.input_bytes + self.output_bytes)


_OP_FIELDS = frozenset(f.name for f in fields(Op))


def readers_of(ops: tuple[Op, ...] | list[Op]) -> dict[int, list[int]]:
    """Each op's index → the indices of the ops that read its output, in order."""
    readers: dict[int, list[int]] = {}
    for op in ops:
        for dep in op.deps:
            readers.setdefault(dep, []).append(op.index)
    return readers


@dataclass(frozen=True)
class Trace:
    """The ops of one step (a decode step, a whole prefill, or an encoder's forward pass)
    of one model."""

    model: str
    model_key: str
    phase: Phase
    batch: int
    context: int
    prompt: int
    tokens: int
    weights_bytes: int
    state_bytes: int
    activation_bytes: int
    ops: tuple[Op, ...] = field(default_factory=tuple)
    #: MoE models: tokens each expert got, per MoE block (the routing policy's counts).
    expert_tokens: tuple[tuple[int, ...], ...] = ()

    def layers(self) -> list[str]:
        """Layer names in model order (first appearance)."""
        return list(dict.fromkeys(op.layer for op in self.ops))

    def to_json(self) -> str:
        data = asdict(self)
        data["format"] = FORMAT_VERSION
        for op in data["ops"]:  # inference traces read as they always have
            if not op["stage"]:
                del op["stage"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Trace:
        data = json.loads(text)
        if data.pop("format", None) != FORMAT_VERSION:
            raise ValueError("trace format version mismatch")
        ops = tuple(Op(**{**op, "deps": tuple(op["deps"])}) for op in data.pop("ops"))
        experts = tuple(tuple(row) for row in data.pop("expert_tokens", ()))
        return cls(**data, ops=ops, expert_tokens=experts)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
