"""Traces of new step shapes derived from a few captured ones, exactly.

In a decoder step every count a trace holds (an op's FLOPs and bytes, its dims, the numbers
in its shape text, the trace's totals) is a polynomial in the batch and the sequence length
of low degree: degree 1 in the batch, and in the length 1 for a decode step (the KV reads
grow with the context) or 2 for a prefill (attention pairs grow with the square of the
prompt). So the trace at any shape follows from captures on a small grid of shapes by
Lagrange interpolation in integers, where the ops, their order, names and dependencies do
not change with the shape.

That is checked, not assumed: a model is derived from only when two more captures (one
small, one at the model's longest sequence: a sliding window shows there) come out of the
interpolation bit for bit; a derived count that is not a whole number refuses the shape;
steps shorter than `MIN_LENGTH` are captured. A model whose trace is not one polynomial
(MoE routing counts, a sliding window, a count that is the larger of two) fails the check
and is captured shape by shape. Serving (simulator.serving.steps) asks for hundreds of shapes of
one model; each would otherwise cost a capture (≈ 1 s for a 32-layer model).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

from simulator.workload.trace import Op, Phase, Trace

#: The grid each phase is captured on: (batches, lengths); its size sets the degrees.
GRID: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "decode": ((2, 3), (64, 96)),
    "prefill": ((2, 3), (32, 48, 64)),
}
#: The far check's length for a model without a position limit.
FAR = 8192
#: Shorter steps are captured: a one-token prompt is traced without a causal mask.
MIN_LENGTH = 2
_NUMBER = re.compile(r"\d+")
_OP_COUNTS = ("ops", "weight_bytes", "state_read_bytes", "state_write_bytes", "input_bytes",
              "output_bytes")
_OP_FIXED = ("index", "name", "fn", "kind", "module", "layer", "dtype", "deps",
             "weight_dtype")
_TRACE_COUNTS = ("tokens", "weights_bytes", "state_bytes", "activation_bytes")

#: (phase, batch, length) → the trace of that step
Capture = Callable[[str, int, int], Trace]


class NotPolynomial(Exception):
    """The captures do not follow one polynomial (or share no structure)."""


def _weights(points: Sequence[int], x: int) -> tuple[list[int], int]:
    """Lagrange weights of `points` at `x` as (numerators, common denominator)."""
    nums, dens = [], []
    for i, p in enumerate(points):
        num = den = 1
        for j, q in enumerate(points):
            if j != i:
                num *= x - q
                den *= p - q
        nums.append(num)
        dens.append(den)
    common = math.lcm(*(abs(d) for d in dens))
    return [n * (common // d) for n, d in zip(nums, dens, strict=True)], common


@dataclass(frozen=True)
class _Plan:
    """How one op's varying counts are filled in: (field, value index) pairs, and its shape
    text as pieces around its numbers (those that vary by value index)."""

    counts: tuple[tuple[str, int], ...]
    dims: tuple[tuple[str, int], ...]
    pieces: tuple[str, ...]
    numbers: tuple[int, ...]
    shape: tuple[tuple[int, int], ...]


class Reshaper:
    """Derives traces of one model and phase from captures on `GRID[phase]`."""

    def __init__(self, phase: Phase, captures: dict[tuple[int, int], Trace]) -> None:
        self.phase = phase
        self.batches, self.lengths = GRID[phase]
        grid = [captures[b, n] for b, n in product(self.batches, self.lengths)]
        first = grid[0]
        if first.expert_tokens or any(len(t.ops) != len(first.ops) for t in grid):
            raise NotPolynomial("routing counts or op lists that change with the shape")
        self.template = first
        self.distinct: dict[tuple[int, ...], int] = {}  # grid values → their index
        self.plans: list[_Plan | None] = []
        for index, ops in enumerate(zip(*(t.ops for t in grid), strict=True)):
            self.plans.append(self._plan(index, ops))
        self.totals = {name: self._index(tuple(getattr(t, name) for t in grid))
                       for name in _TRACE_COUNTS}

    def _index(self, values: tuple[int, ...]) -> int:
        return self.distinct.setdefault(values, len(self.distinct))

    def _plan(self, index: int, ops: tuple[Op, ...]) -> _Plan | None:
        head = ops[0]
        if any(getattr(o, f) != getattr(head, f) for o in ops[1:] for f in _OP_FIXED):
            raise NotPolynomial(f"op {index} differs between shapes")
        if any(o.dims.keys() != head.dims.keys() for o in ops):
            raise NotPolynomial(f"op {index}'s dims differ between shapes")
        if len({tuple(_NUMBER.split(o.shapes)) for o in ops}) != 1:
            raise NotPolynomial(f"op {index}'s shape text differs between shapes")
        counts = tuple((name, self._index(values)) for name in _OP_COUNTS
                       if len(set(values := tuple(getattr(o, name) for o in ops))) > 1)
        dims = tuple((key, self._index(values)) for key in head.dims
                     if len(set(values := tuple(o.dims[key] for o in ops))) > 1)
        numbers = [[int(n) for n in _NUMBER.findall(o.shapes)] for o in ops]
        shape = tuple((position, self._index(values))
                      for position, values in enumerate(zip(*numbers, strict=True))
                      if len(set(values)) > 1)
        if not (counts or dims or shape):
            return None
        return _Plan(counts, dims, tuple(_NUMBER.split(head.shapes)), tuple(numbers[0]), shape)

    def derive(self, batch: int, length: int) -> Trace:
        """The trace of `batch` sequences at `length` (context or prompt tokens)."""
        wb, db = _weights(self.batches, batch)
        wn, dn = _weights(self.lengths, length)
        weights = [a * b for a, b in product(wb, wn)]
        denominator = db * dn
        values = []
        for grid_values in self.distinct:
            total = sum(w * v for w, v in zip(weights, grid_values, strict=True))
            value, rest = divmod(total, denominator)
            if rest or value < 0:
                raise NotPolynomial("a count that is not a whole number")
            values.append(value)
        ops = []
        for op, plan in zip(self.template.ops, self.plans, strict=True):
            if plan is None:
                ops.append(op)
                continue
            changed: dict[str, object] = {name: values[i] for name, i in plan.counts}
            if plan.dims:
                changed["dims"] = {**op.dims, **{key: values[i] for key, i in plan.dims}}
            if plan.shape:
                numbers = list(plan.numbers)
                for position, i in plan.shape:
                    numbers[position] = values[i]
                text = [plan.pieces[0]]
                for number, piece in zip(numbers, plan.pieces[1:], strict=True):
                    text += (str(number), piece)
                changed["shapes"] = "".join(text)
            ops.append(op.evolve(**changed))
        totals = {name: values[i] for name, i in self.totals.items()}
        return Trace(model=self.template.model, model_key=self.template.model_key,
                     phase=self.phase, batch=batch,
                     context=length if self.phase == "decode" else 0,
                     prompt=length if self.phase == "prefill" else 0, **totals,
                     ops=tuple(ops))


def checked_reshaper(phase: Phase, capture: Capture, longest: int | None
                     ) -> Reshaper | None:
    """A Reshaper for `phase` from `capture`, or None where two check captures (a batch of
    one off the grid, and of seven at the model's `longest` sequence, or FAR tokens) do not
    come out of it bit for bit."""
    if phase not in GRID:
        return None
    batches, lengths = GRID[phase]
    try:
        reshaper = Reshaper(phase, {(b, n): capture(phase, b, n)
                                    for b, n in product(batches, lengths)})
        far = (longest or FAR) - (1 if phase == "decode" else 0)
        for batch, length in ((1, max(lengths) + 37), (7, far)):
            if reshaper.derive(batch, length) != capture(phase, batch, length):
                return None
    except NotPolynomial:
        return None
    return reshaper


#: (model key, phase) → its Reshaper, or None where it is not derivable (the last few).
_RESHAPERS: dict[tuple[str, str], Reshaper | None] = {}
_KEEP = 16


def derived(model_key: str, phase: Phase, batch: int, length: int, capture: Capture,
            longest: int | None) -> Trace | None:
    """The trace of (`phase`, `batch`, `length`) derived from `capture`s of the model keyed
    `model_key`; None where the model's traces are not derivable (capture it instead)."""
    if (model_key, phase) not in _RESHAPERS:
        _RESHAPERS[model_key, phase] = checked_reshaper(phase, capture, longest)
        while len(_RESHAPERS) > _KEEP:
            del _RESHAPERS[next(iter(_RESHAPERS))]
    reshaper = _RESHAPERS[model_key, phase]
    if reshaper is None or length < MIN_LENGTH:
        return None
    try:
        return reshaper.derive(batch, length)
    except NotPolynomial:
        return None
