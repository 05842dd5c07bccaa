"""Expert parallelism: an MoE model's experts spread over the devices of a system.

`--ep N` places each MoE block's experts on N devices (by a placement: DeepSpeed-MoE's
contiguous one by default, or a `--placement FILE`). Everything else in a block (attention,
norms, the router, shared experts) runs data-parallel over the N devices: each holds the
whole of those weights and works on its share of the sequences, ⌈B / N⌉ of the batch's B
(so a batch smaller than N leaves devices without a sequence). The routing policy's token
counts (`--moe-routing`) say how many tokens every expert gets; a device runs the experts
placed on it on all the tokens routed to them, from every device.

Two runtimes (`--ep-mode`):

- `combine` (DeepSpeed-MoE, Tutel): per MoE block a dispatch all-to-all sends each of a
  token's k (token, expert) rows from the device that holds the token to its expert's
  device, and a combine all-to-all sends them back. A token is on its sequence's device and
  chooses experts independently of where it is, so device s sends device d the share of
  its rows that d's experts get.
- `coherent` (ExFlow, arXiv 2401.08383; decode steps only): every device holds the context
  of every sequence (the prompts' context was all-gathered once), so a token's next
  attention runs wherever its expert left it and the combine all-to-all is gone: one
  dispatch all-to-all per MoE block, then one all-gather of the step's new tokens (one
  hidden vector each, the paper's G·N·G term) at its end. A row crosses devices between
  two MoE blocks with the placement's cross fraction: `cross_device_hops` over the
  blocks − 1 transitions when the placement file states it (ExFlow's solution files do:
  their `cost` is the mean cross-GPU transitions per token and forward), otherwise as the
  loads fall (independent routing). The first MoE block dispatches from the tokens' own
  devices. Assumed where the paper is silent (it routes top-1): with k > 1 the k − 1 other
  outputs of a token return to its first expert's device (a combine of (k − 1)/k of the
  rows), and a device holds the whole KV cache but attends only for its share of tokens,
  ⌈B / N⌉ of them (under skewed routing the device an expert block leaves the most tokens
  on attends for more: that is not modelled, so skew makes this mode optimistic).

A device's step time is the critical path: in every MoE block the device with the most
routed tokens (then the most active experts), since each all-to-all waits for the slowest.
All-to-alls are timed by the event simulation of the links with their byte matrix.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Literal

from simulator.errors import UserError
from simulator.shares import token_share
from simulator.workload.trace import Op, Trace
from simulator.yamlfile import load_yaml

#: Shipped placement files, found by bare name.
SHIPPED = Path(str(resources.files("workloads") / "placements"))
Mode = Literal["combine", "coherent"]
MODES: tuple[Mode, ...] = ("combine", "coherent")
#: Bytes each device sends each other device in one all-to-all.
Matrix = tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class Placement:
    """Which device of the expert-parallel group holds each expert of each MoE block."""

    devices: int
    table: tuple[tuple[int, ...], ...]  # table[block][expert] → device
    source: str = "contiguous"
    #: mean cross-device transitions of a token between consecutive MoE blocks, per forward
    cross_device_hops: float | None = None

    def experts_on(self, block: int, device: int) -> list[int]:
        return [e for e, d in enumerate(self.table[block]) if d == device]


def contiguous(blocks: int, experts: int, devices: int) -> Placement:
    """DeepSpeed-MoE's placement: expert e of every block on device ⌊e·N / E⌋."""
    row = tuple(e * devices // experts for e in range(experts))
    return Placement(devices, (row,) * blocks)


def load_placement(path: str | Path, devices: int, blocks: int, experts: int) -> Placement:
    """A placement file: ExFlow's solution CSV (`Expert,Node` rows, expert b·E + e) or YAML
    with `placement` (one row of devices per MoE block, or one for all) and optionally
    `cross_device_hops` (mean cross-device transitions per token and forward) and `source`."""
    flag, file = "--placement", Path(path)
    if not file.is_file() and file.parent == Path("."):
        file = SHIPPED / file.name
    if not file.is_file():
        shipped = ", ".join(sorted(p.name for p in SHIPPED.glob("*.yaml")))
        raise UserError(flag, f"{path}: no such file; expected an ExFlow solution CSV, a "
                              f"placement YAML, or a shipped one ({shipped})")
    hops: float | None = None
    source = str(path)
    if file.suffix.lower() == ".csv":
        try:
            with file.open(newline="") as handle:
                rows = list(csv.reader(handle))
            if not rows or [cell.strip() for cell in rows[0]] != ["Expert", "Node"]:
                raise ValueError("expected the header Expert,Node")
            flat = {int(expert): int(device) for expert, device in rows[1:]}
        except (ValueError, OSError) as exc:
            raise UserError(f"{flag} {path}", f"expected rows 'expert,device' under the header "
                                              f"Expert,Node ({exc})") from None
        if sorted(flat) != list(range(blocks * experts)):
            raise UserError(f"{flag} {path}", f"expected experts 0 … {blocks * experts - 1} "
                            f"({blocks} MoE blocks × {experts}), found {len(flat)} rows")
        table = [[flat[b * experts + e] for e in range(experts)] for b in range(blocks)]
    else:
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{flag} {path}", f"cannot read it ({exc})") from None
        data = load_yaml(text, f"{flag} {path}")
        if not isinstance(data, dict) or "placement" not in data:
            raise UserError(f"{flag} {path}", "expected a mapping with 'placement' (a list of "
                                              "devices per expert, per MoE block)")
        unknown = set(data) - {"placement", "cross_device_hops", "source"}
        if unknown:
            raise UserError(f"{flag} {path}", f"unknown field {sorted(unknown)[0]!r}; expected "
                                              "placement, cross_device_hops, source")
        table = data["placement"]
        if (not isinstance(table, list) or not table
                or not all(isinstance(row, list) for row in table)):
            raise UserError(f"{flag} {path}: placement", "expected a list of rows, one per MoE "
                                                         "block (or one for all)")
        if len(table) == 1:
            table = table * blocks
        source = str(data.get("source", source))
        if "cross_device_hops" in data:
            hops = data["cross_device_hops"]
            if isinstance(hops, bool) or not isinstance(hops, (int, float)) or not (
                    0 <= hops <= blocks - 1):
                raise UserError(f"{flag} {path}: cross_device_hops", f"expected a number of "
                                f"transitions 0 … {blocks - 1}, not {hops!r}")
            hops = float(hops)
    if len(table) != blocks:
        raise UserError(f"{flag} {path}", f"expected {blocks} rows (one per MoE block), "
                                          f"found {len(table)}")
    for b, row in enumerate(table):
        if len(row) != experts or not all(isinstance(d, int) and not isinstance(d, bool)
                                          and 0 <= d < devices for d in row):
            raise UserError(f"{flag} {path}", f"MoE block {b}: expected {experts} devices in "
                            f"0 … {devices - 1} (--ep {devices}), got {row!r}")
    return Placement(devices, tuple(tuple(row) for row in table), source, hops)


def expert_chains(trace: Trace) -> list[list[list[Op]]]:
    """Per MoE block, the op chain of each active expert (in expert order): the ops of the
    block's `.experts` module, each chain from its `index_select` of the routed tokens."""
    blocks: dict[str, list[list[Op]]] = {}
    for op in trace.ops:
        if is_expert(op):
            chains = blocks.setdefault(op.layer, [])
            if op.fn == "index_select" or not chains:
                chains.append([])
            chains[-1].append(op)
    return list(blocks.values())


def expert_bytes(trace: Trace) -> dict[str, int]:
    """Weight bytes of one expert of each MoE block (by its layer); a block's experts are
    alike."""
    return {chain[0][0].layer: sum(op.weight_bytes for op in chain[0])
            for chain in expert_chains(trace) if chain}


def is_expert(op: Op) -> bool:
    return ".experts" in op.module and op.module.split(".experts")[1][:1] in ("", ".")


@dataclass(frozen=True)
class ExpertSplit:
    """The critical device's share of a step under expert parallelism and the byte matrix
    of each all-to-all it runs (keyed by the collective op's module)."""

    trace: Trace
    matrices: dict[str, Matrix]


def _loads(counts: tuple[int, ...], placement: Placement, block: int) -> list[int]:
    loads = [0] * placement.devices
    for expert, tokens in enumerate(counts):
        loads[placement.table[block][expert]] += tokens
    return loads


def _independent(src: list[float], dst: list[float]) -> list[list[float]]:
    """Rows from each device to each other when where a row goes does not depend on where
    it is: src[s]·dst[d] / Σdst, the diagonal (staying put) dropped."""
    total = sum(dst)
    return [[src[s] * dst[d] / total if s != d and total else 0.0 for d in range(len(dst))]
            for s in range(len(src))]


def _scaled_off_diagonal(matrix: list[list[float]], rows: float) -> list[list[float]]:
    """`matrix` rescaled so that its off-diagonal entries hold `rows` in all."""
    total = sum(map(sum, matrix))
    return [[v * rows / total if total else 0.0 for v in row] for row in matrix]


def _scale(op: Op, share: float, sequences: int) -> Op:
    """A data-parallel device's part of a non-expert op: `share` of its work and bytes
    (attention: `sequences` of the batch); weights whole."""
    part = token_share(op, share)
    if op.kind == "attention":
        heads = op.dims["parallel"] // op.dims["batch"]  # parallel = batch × heads
        return replace(part, dims={**op.dims, "batch": sequences,
                                   "parallel": sequences * heads})
    return part


def _collective(kind: str, at: Op, block: int, devices: int, nbytes: float, name: str) -> Op:
    """A collective of the expert exchange (`name`: dispatch, combine, context_allgather);
    its dims tell apart ops whose timing differs (their byte matrices do)."""
    return Op(index=0, name=kind, fn=kind, kind="collective", module=f"{at.layer}.{name}",
              layer=at.layer, dtype=at.dtype, ops=0, weight_bytes=0, state_read_bytes=0,
              state_write_bytes=0, input_bytes=math.ceil(nbytes), output_bytes=math.ceil(nbytes),
              dims={"devices": devices, "block": block, "combine": int(name == "combine")},
              shapes=f"{math.ceil(nbytes)} B from the busiest of {devices} devices", deps=())


def split_experts(trace: Trace, placement: Placement, mode: Mode, top_k: int) -> ExpertSplit:
    """The critical device's trace of `trace` (the whole step, every device's tokens) under
    expert parallelism by `placement` (see the module notes)."""
    n = placement.devices
    chains = expert_chains(trace)
    counts = trace.expert_tokens
    if len(chains) != len(counts) or len(placement.table) != len(counts):
        raise ValueError("expert chains, routing counts and placement disagree")
    sequences = math.ceil(trace.batch / n)
    share = sequences / trace.batch
    tokens = trace.tokens
    first = next(e for e, c in enumerate(counts[0]) if c)
    row_bytes = chains[0][0][0].output_bytes / counts[0][first]  # a token's hidden vector
    loads = [_loads(c, placement, b) for b, c in enumerate(counts)]
    busiest = [max(range(n), key=lambda d, b=b: (loads[b][d], len(
        [e for e in placement.experts_on(b, d) if counts[b][e]]), -d)) for b in range(len(counts))]
    # a sequence's rows start on its own device (sequence i on device i mod N)
    home = [tokens * top_k * (trace.batch // n + (d < trace.batch % n)) / trace.batch
            for d in range(n)]
    matrices: dict[str, Matrix] = {}
    ops: list[Op] = []
    moved: dict[int, int] = {}
    kept: set[int] = set()
    for b, block_chains in enumerate(chains):
        active = [e for e, c in enumerate(counts[b]) if c]
        for expert, chain in zip(active, block_chains, strict=True):
            if placement.table[b][expert] == busiest[b]:
                kept.update(op.index for op in chain)
    expert_ops = {op.index for block in chains for chain in block for op in chain}
    first_expert = {chain[0][0].index: b for b, chain in enumerate(chains) if chain}
    last_expert = {chain[-1][-1].index: b for b, chain in enumerate(chains) if chain}

    def emit(op: Op) -> int:
        ops.append(replace(op, index=len(ops), deps=tuple(dict.fromkeys(
            moved[d] for d in op.deps if d in moved))))
        return len(ops) - 1

    def all_to_all(at: Op, b: int, matrix: list[list[float]], name: str, deps: tuple[int, ...]
                   ) -> int:
        scaled = tuple(tuple(v * row_bytes for v in row) for row in matrix)
        sent = max(map(sum, scaled))
        op = _collective("alltoall", at, b, n, sent, name)
        matrices[op.module] = scaled
        ops.append(replace(op, index=len(ops), deps=deps))
        return len(ops) - 1

    previous_loads: list[int] | None = None
    for op in trace.ops:
        b = first_expert.get(op.index)
        if b is not None:  # the dispatch, before the block's first expert chain
            dst = [float(v) for v in loads[b]]
            if mode == "combine" or previous_loads is None:
                matrix = _independent(home, dst)
            else:
                matrix = _independent([float(v) for v in previous_loads], dst)
                if placement.cross_device_hops is not None and len(counts) > 1:
                    fraction = placement.cross_device_hops / (len(counts) - 1)
                    matrix = _scaled_off_diagonal(matrix, fraction * tokens * top_k)
            # after the router (the op just before), which decided where rows go
            dispatch = moved_section = all_to_all(op, b, matrix, "dispatch", (len(ops) - 1,))
        if is_expert(op):
            if op.index in kept:  # its routed rows arrive with the dispatch
                deps = tuple(dict.fromkeys(moved[d] if d in expert_ops else dispatch
                                           for d in op.deps))
                ops.append(replace(op, index=len(ops), deps=deps))
                moved[op.index] = moved_section = len(ops) - 1
            else:
                moved[op.index] = moved_section
            b = last_expert.get(op.index)
            if b is not None:  # the combine (or ExFlow's partial one), after the last chain
                dst = [float(v) for v in loads[b]]
                if mode == "combine":
                    matrix = [list(row) for row in zip(*_independent(home, dst), strict=True)]
                    moved[op.index] = all_to_all(op, b, matrix, "combine", (moved_section,))
                elif top_k > 1:  # the k − 1 other outputs to the first expert's device
                    rows = [v * (top_k - 1) / top_k for v in dst]
                    matrix = _independent(rows, [v / top_k for v in dst])
                    moved[op.index] = all_to_all(op, b, matrix, "combine", (moved_section,))
                previous_loads = loads[b]
            continue
        if op.kind == "collective":
            moved[op.index] = emit(op)
        else:
            moved[op.index] = emit(_scale(op, share, sequences))
    if mode == "coherent":
        last = ops[-1]
        gather = _collective("allgather", last, len(counts), n, tokens * row_bytes,
                             "context_allgather")
        ops.append(replace(gather, index=len(ops), deps=(len(ops) - 1,)))
    state = trace.state_bytes if mode == "coherent" else math.ceil(trace.state_bytes * share)
    device = replace(trace, model=f"{trace.model} [ep {n}]", ops=tuple(ops), state_bytes=state)
    return ExpertSplit(device, matrices)

