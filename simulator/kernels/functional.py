"""A functional run: a small model computed by the hardware kernels, along the schedule
the engine simulates, and compared with its PyTorch reference.

The model runs for real on the CPU under a dispatch mode that numbers ops exactly as the
trace capture does. Each op with a hardware kernel (ternary matmul, matmul, RMSNorm, the
MLGRU scan, attention, embedding) is replaced by that kernel executed tile by tile, core
by core, as simulator.decompose expands the schedule the mapped task was timed with:
the same tiles, blocks and chunks on the same cores, split-K partial sums added up. Each
op records how many timed units it ran (`tiles_checked` against `tiles_timed`). Every
other op is computed by PyTorch and counted as such. A `Fault` breaks the schedule on
purpose (a dropped tile, a core given the wrong slice) so a test can see the check fail.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from simulator.decompose import (
    Tile,
    attention_blocks,
    matmul_tiles,
    slices,
    timed_units,
    unfused_attention,
)
from simulator.kernels import ternary, vector
from simulator.mapping import Task
from simulator.schedule import GemmSchedule
from simulator.workload.capture import is_recorded
from simulator.workload.trace import Op

KERNEL_KINDS = frozenset({"ternary_matmul", "matmul", "norm", "recurrence", "attention",
                          "embedding"})


@dataclass(frozen=True)
class Fault:
    """Break the schedule of the first op of `kind`: drop a core's first tile, or give it
    a slice one row/column off."""

    kind: str
    action: Literal["drop_tile", "misslice"]
    core: int = 0


@dataclass
class OpCheck:
    index: int
    name: str
    kind: str
    by_kernel: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    tiles_timed: int = 0
    tiles_checked: int = 0


@dataclass
class Executor:
    """Replays a model's ops, computing those with kernels along the mapped schedule."""

    ops: tuple[Op, ...]
    tasks: list[Task]
    fault: Fault | None = None
    checks: list[OpCheck] = field(default_factory=list)
    faulted: bool = False
    #: the tiles, blocks and chunks each kernel op ran, by op index
    executed: dict[int, list[Any]] = field(default_factory=dict)
    _ran: list[Any] = field(default_factory=list, repr=False)

    def run(self, index: int, func: Any, args: tuple[Any, ...], reference: Any) -> Any:
        op, task = self.ops[index], self.tasks[index]
        name = f"{func.namespace}.{func.overloadpacket.__name__}"
        if op.name != name:
            raise RuntimeError(f"op {index} is {name} but the trace has {op.name}")
        if op.kind not in KERNEL_KINDS or (op.kind == "matmul" and len(args) < 2):
            self.checks.append(OpCheck(index, name, op.kind, False))
            return reference
        fault = self.fault if (self.fault and not self.faulted
                               and self.fault.kind == op.kind) else None
        self.faulted |= fault is not None
        ran = self._ran = self.executed[index] = []
        result = getattr(self, f"_{op.kind}")(op, task, args, fault)
        outs = [t for t in tree_flatten(reference)[0] if isinstance(t, torch.Tensor)]
        mine = result if isinstance(result, tuple) else (result,)
        converted = tuple(torch.from_numpy(np.ascontiguousarray(m)).reshape(r.shape).to(r.dtype)
                          for m, r in zip(mine, outs, strict=True))
        errors = [(c.double() - r.double()).abs() for c, r in zip(converted, outs, strict=True)]
        scale = max(float(r.double().abs().max()) for r in outs) or 1.0
        worst = max(float(e.max()) for e in errors) if errors else 0.0
        self.checks.append(OpCheck(index, name, op.kind, True, worst, worst / scale,
                                   timed_units(task), len({piece.unit for piece in ran})))
        return converted if isinstance(reference, tuple) else converted[0]

    def _each(self, pieces: Iterable[Any]) -> Iterator[Any]:
        """Run `pieces` (tiles, blocks, chunks) in order, noting each as executed."""
        for piece in pieces:
            self._ran.append(piece)
            yield piece

    # -- kernels -------------------------------------------------------------------------

    def _tiles(self, op: Op, task: Task, fault: Fault | None) -> Iterator[Tile]:
        tiles = matmul_tiles(op, task)
        if fault is not None:
            mine = [i for i, t in enumerate(tiles) if t.core == fault.core]
            if fault.action == "drop_tile":
                tiles = [t for i, t in enumerate(tiles) if i != mine[0]]
            else:  # shifted one column: one column twice, another never
                first = tiles[mine[0]]
                tiles[mine[0]] = replace(first, cols=(first.cols[0] + 1, first.cols[1] + 1))
        return self._each(tiles)

    def _ternary_matmul(self, op: Op, task: Task, args: tuple[Any, ...], fault: Fault | None
                        ) -> np.ndarray:
        x, packed, k = args[0].numpy(), args[1].numpy(), int(args[2])
        rows = x.reshape(-1, k)
        out = np.zeros((rows.shape[0], packed.shape[0]), dtype=np.int32)
        for tile in self._tiles(op, task, fault):
            (r0, r1), (c0, c1), (k0, k1) = tile.rows, tile.cols, tile.depth
            c1 = min(c1, packed.shape[0])
            weights = ternary.signs(packed[c0:c1], k)
            part = ternary.pack(np.where(weights[0], 1, np.where(weights[1], -1, 0))[:, k0:k1])
            out[r0:r1, c0:c1] += ternary.matmul(rows[r0:r1, k0:k1], part, k1 - k0)
        return out

    def _matmul(self, op: Op, task: Task, args: tuple[Any, ...], fault: Fault | None
                ) -> np.ndarray:
        bias = None
        if len(args) == 3:  # addmm(bias, a, b)
            bias, a, b = (t.float().numpy() for t in args)
        else:
            a, b = args[0].float().numpy(), args[1].float().numpy()
        a2 = a.reshape(-1, a.shape[-1])
        out = np.zeros((a2.shape[0], b.shape[-1]), dtype=np.float32)
        for tile in self._tiles(op, task, fault):
            (r0, r1), (c0, c1), (k0, k1) = tile.rows, tile.cols, tile.depth
            out[r0:r1, c0:c1] += a2[r0:r1, k0:k1] @ b[k0:k1, c0:c1]
        return out + bias if bias is not None else out

    def _norm(self, op: Op, task: Task, args: tuple[Any, ...], fault: Fault | None
              ) -> np.ndarray:
        x, weight, eps = args[0].float().numpy(), args[1].float().numpy(), float(args[2])
        rows = x.reshape(-1, x.shape[-1])
        out = np.zeros_like(rows)
        for chunk in self._each(slices(op, task)):
            a, b = chunk.span
            out[a:b] = vector.rms_norm(rows[a:b], weight, eps)
        return out

    def _recurrence(self, op: Op, task: Task, args: tuple[Any, ...], fault: Fault | None
                    ) -> tuple[np.ndarray, np.ndarray]:
        f, c, h0 = (t.float().numpy() for t in args)
        b, steps, d = f.shape
        # the parallel extent is B·d: each core scans its own channels over all steps
        ff = f.transpose(1, 0, 2).reshape(steps, b * d)
        cc = c.transpose(1, 0, 2).reshape(steps, b * d)
        hh = h0.reshape(b * d)
        out = np.zeros((steps, b * d), dtype=np.float32)
        last = np.zeros(b * d, dtype=np.float32)
        for chunk in self._each(slices(op, task)):
            lo, hi = chunk.span
            seq, end = vector.mlgru_scan(ff[None, :, lo:hi], cc[None, :, lo:hi], hh[None, lo:hi])
            out[:, lo:hi], last[lo:hi] = seq[0], end[0]
        return out.reshape(steps, b, d).transpose(1, 0, 2), last.reshape(b, d)

    def _attention(self, op: Op, task: Task, args: tuple[Any, ...], fault: Fault | None
                   ) -> np.ndarray:
        q, k, v = (t.float().numpy() for t in args[:3])
        causal = bool(args[3])
        if any(isinstance(schedule, GemmSchedule) for schedule in task.schedules):
            return self._unfused_attention(op, task, q, k, v, causal)
        group = q.shape[1] // k.shape[1]
        sq, sk = q.shape[2], k.shape[2]
        pieces: dict[tuple[int, int, int], list[Any]] = {}
        for blk in self._each(attention_blocks(op, task)):
            (r0, r1), (k0, k1) = blk.rows, blk.keys
            pieces.setdefault((blk.batch, blk.head, r0), []).append(vector.flash_attention(
                q[blk.batch, blk.head, r0:r1], k[blk.batch, blk.head // group, k0:k1],
                v[blk.batch, blk.head // group, k0:k1],
                (sk - sq + r0 - k0) if causal else None, blk.kv_tile))
        out = np.zeros_like(q)
        for (bi, hi, r0), parts in pieces.items():
            merged = vector.merge(parts)
            out[bi, hi, r0:r0 + merged.shape[0]] = merged
        return out

    def _unfused_attention(self, op: Op, task: Task, q: np.ndarray, k: np.ndarray,
                           v: np.ndarray, causal: bool) -> np.ndarray:
        """S = QKᵀ tile by tile, the mask and softmax row chunk by row chunk, O = PV."""
        kernels = unfused_attention(op, task)
        b, h, sq, d = q.shape
        sk = k.shape[2]
        keys = np.repeat(k, h // k.shape[1], axis=1).reshape(b * h, sk, d)
        values = np.repeat(v, h // v.shape[1], axis=1).reshape(b * h, sk, d)
        queries = q.reshape(b * h * sq, d)
        scores = np.zeros((b * h * sq, sk), dtype=np.float32)
        for tile in self._each(kernels.scores):
            (r0, r1), (c0, c1), (k0, k1) = tile.rows, tile.cols, tile.depth
            scores[r0:r1, c0:c1] += queries[r0:r1, k0:k1] @ keys[r0 // sq, c0:c1, k0:k1].T
        last_key = np.arange(b * h * sq) % sq + (sk - sq)  # the last key each row sees
        for chunk in self._each(kernels.mask):
            a, e = chunk.span
            seen = np.arange(sk)[None, :] <= last_key[a:e, None]
            scores[a:e] = np.where(seen, scores[a:e], -np.inf)
        probs = np.zeros_like(scores)
        for chunk in self._each(kernels.softmax):
            a, e = chunk.span
            row = np.exp(scores[a:e] / np.sqrt(d) - (scores[a:e] / np.sqrt(d)).max(
                axis=1, keepdims=True))
            probs[a:e] = row / row.sum(axis=1, keepdims=True)
        out = np.zeros((b * h * sq, d), dtype=np.float32)
        for tile in self._each(kernels.output):
            (r0, r1), (c0, c1), (k0, k1) = tile.rows, tile.cols, tile.depth
            out[r0:r1, c0:c1] += probs[r0:r1, k0:k1] @ values[r0 // sq, k0:k1, c0:c1]
        return out.reshape(b, h, sq, d)

    def _embedding(self, op: Op, task: Task, args: tuple[Any, ...], fault: Fault | None
                   ) -> np.ndarray:
        table, ids = args[0].float().numpy(), args[1].numpy()
        flat = ids.reshape(-1)
        out = np.zeros((flat.size, table.shape[1]), dtype=np.float32)
        for chunk in self._each(slices(op, task)):
            a, b = chunk.span
            out[a:b] = table[flat[a:b]]
        return out


class Replay(TorchDispatchMode):
    """Numbers ops as the trace capture does and lets an Executor compute them."""

    def __init__(self, executor: Executor) -> None:
        super().__init__()
        self.executor = executor
        self.index = 0
        self.paused = False

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Ops run inside are the observer's own (copying outputs), not the model's."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if self.paused or not is_recorded(func, ins):
            return out
        index, self.index = self.index, self.index + 1
        if func._schema.is_mutable:  # in-place ops keep their own result
            self.executor.run(index, func, args, out)
            return out
        return self.executor.run(index, func, args, out)


def counts(checks: list[OpCheck]) -> tuple[Counter[str], Counter[str]]:
    """Op kinds computed by kernels, and by the PyTorch reference."""
    by_kernel = Counter(c.kind for c in checks if c.by_kernel)
    by_reference = Counter(c.kind for c in checks if not c.by_kernel)
    return by_kernel, by_reference
