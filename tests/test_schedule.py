"""One schedule: `simulate check` runs exactly the tiles, blocks and chunks the engine
times, on the same cores, with the same extents.

The expected pieces are worked out here from each mapped task's schedule (the numbering
simulator.schedule documents), and the schedule is tied to the parts the engine times
(which cores, how many tiles or chunks each, the plan the heuristic picks) without going
through simulator.decompose, so a decomposition that re-plans or re-assigns fails.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from simulator.cli import main
from simulator.decompose import attention_blocks, matmul_tiles, slices, timed_units
from simulator.hardware import load_hardware, shipped
from simulator.hardware.schema import Hardware
from simulator.hardware.select import unit_for
from simulator.kernels.check import run_check
from simulator.mapping import Task, map_op, map_trace, matmul_inputs
from simulator.schedule import FlashSchedule, GemmSchedule, SliceSchedule
from simulator.tiling import DTYPE_BYTES, plan_gemm
from simulator.workload.cache import get_trace
from simulator.workload.trace import Op
from workloads.config import resolve_model

KERNEL_KINDS = ("matmul", "ternary_matmul", "norm", "recurrence", "attention", "embedding")
#: phase, batch, context, prompt; the long prompt gives GPUs more tiles and attention
#: blocks than cores (so contiguous runs and the balance differ from round-robin)
SHAPES = {"decode": ("decode", 2, 12, 0), "prefill": ("prefill", 2, 0, 24),
          "long prefill": ("prefill", 2, 0, 640)}
Piece = tuple[Any, ...]


def _cut(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    used = max(1, min(parts, stop - start))
    edges = [start + (stop - start) * i // used for i in range(used + 1)]
    sizes = sorted((b - a for a, b in itertools.pairwise(edges)), reverse=True)
    out = []
    for size in sizes:  # larger pieces first, as the mapping's splits
        out.append((start, start + size))
        start += size
    return out


def _gemm_cell(s: GemmSchedule, unit: int) -> tuple[Any, ...]:
    """(rows, cols, depth) of tile `unit`: row tile fastest, then column, batch, K slice."""
    row_tiles, col_tiles = math.ceil(s.m / s.tm), math.ceil(s.n / s.tn)
    i, j = unit % row_tiles, unit // row_tiles % col_tiles
    entry, split = unit // (row_tiles * col_tiles) % s.batch, unit // (
        row_tiles * col_tiles * s.batch)
    span = math.ceil(s.k / s.split_k)
    return ((entry * s.m + i * s.tm, entry * s.m + min(s.m, (i + 1) * s.tm)),
            (j * s.tn, min(s.n, (j + 1) * s.tn)), (split * span, min(s.k, (split + 1) * span)))


def _expected_gemm(s: GemmSchedule) -> list[Piece]:
    return [(core, unit, *_gemm_cell(s, unit)) for core, (start, stop) in enumerate(s.runs)
            for unit in range(start, stop)]


def _expected_flash(s: FlashSchedule) -> list[Piece]:
    out = []
    outer = len(s.counts)
    for core, mine in enumerate(s.cores):
        for unit in mine:
            tile, split = unit % outer, unit // outer % s.splits
            pair = unit // (outer * s.splits)
            per = math.ceil(s.counts[tile] / s.splits)
            first, last = split * per, max(split * per, min(s.counts[tile], (split + 1) * per))
            out.append((core, unit, pair // s.heads, pair % s.heads,
                        (tile * s.outer_tile, min(s.q_len, (tile + 1) * s.outer_tile)),
                        (min(s.kv_len, first * s.inner_tile), min(s.kv_len, last * s.inner_tile))))
    return out


def _expected_slices(op: Op, s: SliceSchedule) -> list[Piece]:
    out, unit = [], 0
    for core, chunks in enumerate(s.chunks):
        if op.kind in ("matmul", "ternary_matmul"):  # chunks stream the weight columns
            out += [(core, unit + n, s.rows[core], cols, (0, op.dims["k"]))
                    for n, cols in enumerate(_cut(*s.cols[core], chunks))]
        elif op.kind == "attention":  # chunks stream the KV cache
            d = op.dims
            out += [(core, unit + n, pair // d["heads"], pair % d["heads"], (0, d["q_len"]), keys)
                    for n, keys in enumerate(_cut(0, d["kv_len"], chunks))
                    for pair in range(*s.rows[core])]
        else:
            out += [(core, unit + n, span) for n, span in enumerate(_cut(*s.rows[core], chunks))]
        unit += chunks
    return out


def expected(op: Op, task: Task) -> list[Piece]:
    """The pieces the task was timed with, core by core."""
    (schedule,) = task.schedules  # every kernel op of the presets is one kernel
    if isinstance(schedule, GemmSchedule):
        return _expected_gemm(schedule)
    if isinstance(schedule, FlashSchedule):
        return _expected_flash(schedule)
    assert isinstance(schedule, SliceSchedule)
    return _expected_slices(op, schedule)


def checked(op: Op, task: Task) -> list[Any]:
    """What the functional check expands the task into."""
    if op.kind in ("matmul", "ternary_matmul"):
        return matmul_tiles(op, task)
    return attention_blocks(op, task) if op.kind == "attention" else slices(op, task)


def normal(piece: Any) -> Piece:
    fields = ("rows", "cols", "depth") if hasattr(piece, "depth") else (
        ("batch", "head", "rows", "keys") if hasattr(piece, "keys") else ("span",))
    return (piece.core, piece.unit, *(getattr(piece, name) for name in fields))


def gemm_plan(hw: Hardware, op: Op, elem: tuple[float, float, float] | None = None
              ) -> tuple[int, int, int]:
    """(tm, tn, split_k) the heuristic picks for `op` with its own element sizes (weights
    at their stored width), or with `elem`."""
    d = op.dims
    name, unit, _ = unit_for(hw, op.kind, op.dtype, op.module)
    inputs = matmul_inputs(op, hw, name, unit)
    plan = plan_gemm(hw, unit, inputs.rate, d["m"], d["n"], d["k"], d["batch"],
                     elem or inputs.elem, inputs.unpack)
    return plan.tm, plan.tn, plan.split_k


def assert_timed(hw: Hardware, op: Op, task: Task) -> None:
    """The schedule is the one the parts were timed with."""
    (stage,) = task.stages
    (schedule,) = task.schedules
    cores = sorted(core for part in stage for core in part.cores)
    if isinstance(schedule, GemmSchedule):
        assert (schedule.tm, schedule.tn, schedule.split_k) == gemm_plan(hw, op)
        assert cores == list(range(len(schedule.runs)))
        grid = math.ceil(schedule.m / schedule.tm) * math.ceil(schedule.n / schedule.tn)
        assert schedule.tiles == grid * schedule.batch * schedule.split_k
        # each part's compute is its cores' tile count times one tile's
        per_tile = [part.compute_ns / (schedule.runs[c][1] - schedule.runs[c][0])
                    for part in stage for c in part.cores]
        assert max(per_tile) == pytest.approx(min(per_tile), rel=1e-12)
    elif isinstance(schedule, FlashSchedule):
        assert cores == list(range(len(schedule.cores)))
        blocks = sorted(unit for mine in schedule.cores for unit in mine)
        assert blocks == list(range(schedule.batch * schedule.heads * schedule.splits
                                    * len(schedule.counts)))
    else:
        chunks = {core: part.chunks for part in stage for core in part.cores}
        assert chunks == dict(enumerate(schedule.chunks))
        if not schedule.cols:  # cores timed alike got slices alike (a matmul's grid
            for part in stage:  # cells are all timed as the mean cell)
                assert len({stop - start for start, stop in
                            (schedule.rows[core] for core in part.cores)}) == 1


def assert_covers(op: Op, pieces: list[Any]) -> None:
    """Every output (and K / key range) is computed exactly once."""
    d = op.dims
    if op.kind in ("matmul", "ternary_matmul"):  # K slices partition K; each covers C once
        k_slices = sorted({t.depth for t in pieces})
        assert [a for a, _ in k_slices] == [0, *(b for _, b in k_slices[:-1])]
        assert k_slices[-1][1] == d["k"]
        cover = np.zeros((len(k_slices), d["m"] * d["batch"], d["n"]), dtype=np.int32)
        for t in pieces:
            cover[k_slices.index(t.depth), slice(*t.rows), slice(*t.cols)] += 1
    elif op.kind == "attention":
        cover = np.zeros((d["batch"], d["heads"], d["q_len"], d["kv_len"]), dtype=np.int32)
        for b in pieces:
            cover[b.batch, b.head, slice(*b.rows), slice(*b.keys)] += 1
        if d.get("causal"):  # flash blocks skip keys no query of theirs sees
            seen = np.tril(np.ones((d["q_len"], d["kv_len"]), dtype=bool), d["kv_len"] - d["q_len"])
            cover = np.where(seen, cover, 1)
    else:
        cover = np.zeros(d["parallel"], dtype=np.int32)
        for c in pieces:
            cover[slice(*c.span)] += 1
    assert cover.min() == 1 and cover.max() == 1, op.module


def _kernel_ops(hw: Hardware, model: str, shape: str, mapping: str
                ) -> list[tuple[Op, Task]]:
    phase, batch, context, prompt = SHAPES[shape]
    trace = get_trace(resolve_model(model), phase, batch, context, prompt)  # type: ignore[arg-type]
    seen, out = set(), []
    for op, task in zip(trace.ops, map_trace(trace, hw, mapping), strict=True):  # type: ignore[arg-type]
        key = (op.kind, op.dtype, op.weight_bytes, tuple(sorted(op.dims.items())))
        if op.kind in KERNEL_KINDS and key not in seen:
            seen.add(key)
            out.append((op, task))
    return out


@pytest.mark.parametrize("mapping", ["tensor", "batch"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("hardware", shipped())
def test_checked_pieces_are_the_timed_ones(hardware: str, model: str, shape: str,
                                           mapping: str) -> None:
    hw = load_hardware(hardware)
    for op, task in _kernel_ops(hw, model, shape, mapping):
        assert_timed(hw, op, task)
        pieces = checked(op, task)
        assert [normal(p) for p in pieces] == expected(op, task), (op.module, op.kind)
        assert len({p.unit for p in pieces}) == timed_units(task), op.module
        assert_covers(op, pieces)


def _ternary_op(template: Op, m: int, n: int, k: int) -> Op:
    d = template.dims
    return replace(template, dims={"m": m, "n": n, "k": k, "batch": 1, "parallel": n},
                   weight_bytes=n * k // 4, ops=2 * m * n * k,
                   input_bytes=template.input_bytes * m * k // (d["m"] * d["k"]),
                   output_bytes=template.output_bytes * m * n // (d["m"] * d["n"]))


def test_ternary_matmuls_on_the_a100_are_checked_with_the_timed_plan() -> None:
    hw = load_hardware("gpu_a100.yaml")
    ops = [pair for shape in SHAPES for pair in _kernel_ops(hw, "tiny", shape, "tensor")
           if pair[0].kind == "ternary_matmul"]
    template = ops[0][0]
    ops += [(op, map_op(op, hw, "tensor", 1, 64)) for op in (
        _ternary_op(template, m, n, k) for m in (1, 128, 2048)
        for n, k in ((2048, 2048), (5632, 2048), (2048, 5632)))]
    replanned = 0
    for op, task in ops:
        tiles = matmul_tiles(op, task)
        tm = max(t.rows[1] - t.rows[0] for t in tiles)
        tn = max(t.cols[1] - t.cols[0] for t in tiles)
        timed = gemm_plan(hw, op)
        assert (tm, tn, len({t.depth for t in tiles})) == (
            min(timed[0], op.dims["m"]), min(timed[1], op.dims["n"]), timed[2]), op.dims
        assert [normal(t) for t in tiles] == expected(op, task)
        elem = DTYPE_BYTES.get(op.dtype, 2)
        replanned += gemm_plan(hw, op, (elem,) * 3) != timed
    assert replanned >= len(ops) // 3  # a check that re-planned would differ on these


@pytest.mark.parametrize(("hardware", "model", "phase", "mapping", "batch"), [
    ("gpu_a100.yaml", "tiny", "decode", "tensor", 1),
    ("gpu_a100.yaml", "tiny", "prefill", "tensor", 2),
    ("gpu_h100.yaml", "tiny-llama", "prefill", "tensor", 2),
    ("fpga_8core.yaml", "tiny", "decode", "batch", 4),
    ("fpga_26core.yaml", "tiny-llama", "prefill", "tensor", 1)])
def test_the_functional_run_executes_the_timed_pieces(hardware: str, model: str, phase: str,
                                                      mapping: str, batch: int) -> None:
    hw = load_hardware(hardware)
    cfg = resolve_model(model)
    result = run_check(hw, cfg, mapping=mapping, batch=batch, phase=phase,  # type: ignore[arg-type]
                       context=8, prompt=24)
    assert result.passed
    assert not result.unchecked, [(c.index, c.kind, c.tiles_checked, c.tiles_timed)
                                  for c in result.unchecked]
    trace = get_trace(cfg, phase, batch, 8 if phase == "decode" else 0,  # type: ignore[arg-type]
                      24 if phase == "prefill" else 0)
    tasks = map_trace(trace, hw, mapping)  # type: ignore[arg-type]
    kernel_ops = [check for check in result.ops if check.by_kernel]
    assert {c.kind for c in kernel_ops} >= {"norm", "embedding"}
    for check in kernel_ops:
        op, task = trace.ops[check.index], tasks[check.index]
        assert [normal(p) for p in result.executed[check.index]] == expected(op, task)
        assert check.tiles_checked == check.tiles_timed == timed_units(task)


def test_check_json_reports_the_timed_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--hw", "gpu_a100.yaml", "--model", "tiny", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schedule"] == "timed" and report["unchecked_ops"] == []
    assert report["ops"] and all(
        {"tiles_timed", "tiles_checked", "max_abs_error", "max_rel_error"} <= set(op)
        and op["tiles_checked"] == op["tiles_timed"] > 0 for op in report["ops"])
    assert {op["kind"] for op in report["ops"]} >= {"ternary_matmul", "norm", "recurrence"}


def test_a_dropped_tile_shows_as_unchecked() -> None:
    from simulator.kernels.functional import Fault

    result = run_check(load_hardware("gpu_a100.yaml"), resolve_model("tiny-llama"),
                       fault=Fault("matmul", "drop_tile", 0))
    (gap,) = result.unchecked
    assert gap.kind == "matmul" and gap.tiles_checked == gap.tiles_timed - 1
