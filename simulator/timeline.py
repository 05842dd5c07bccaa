"""A simulated run as a Chrome/Perfetto trace (JSON): open it at ui.perfetto.dev.

One process for the chip; one track (thread) per core functional unit, per core's
load-store port (its DMA engine), per DRAM channel, the L2 and the host link. Each slice
is named by its op and layer and carries bytes and operations; times in microseconds.
Grouped cores (identical work) appear on the track of the group's first core.

A system run (simulator.parallel) is drawn one process per device of a replica, each with
an `ops` track (its kernels, every micro-batch where the pipeline ran it) and a `links`
track (its collectives), and one `links` process with a track per stage hand-over.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

from simulator.engine import Timeline
from simulator.hardware.schema import Hardware
from simulator.workload.trace import Op, Trace

_ORDER = re.compile(r"^core(\d+)\.(.+)$")


def _track_key(track: str) -> tuple[int, int, str]:
    match = _ORDER.match(track)
    if match:
        return (0, int(match.group(1)), match.group(2))
    if track.startswith("dram"):
        return (1, int(track[4:]), "")
    return (2, 0, track)


def chrome_trace(hw: Hardware, trace: Trace, timeline: Timeline) -> dict[str, object]:
    """The trace-event JSON object of one simulated step."""
    tracks = sorted({s.track for s in timeline.slices}, key=_track_key)
    tid = {track: number + 1 for number, track in enumerate(tracks)}
    compute_ns: dict[int, float] = defaultdict(float)
    for piece in timeline.slices:
        if _ORDER.match(piece.track) and not piece.track.endswith(".dma"):
            compute_ns[piece.op] += piece.end_ns - piece.start_ns
    events: list[dict[str, object]] = [
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0,
         "args": {"name": f"{hw.name} ({trace.model}, {trace.phase})"}}]
    events += [{"ph": "M", "name": "thread_name", "pid": 1, "tid": tid[t], "args": {"name": t}}
               for t in tracks]
    events += [{"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": tid[t],
                "args": {"sort_index": tid[t]}} for t in tracks]
    for piece in sorted(timeline.slices, key=lambda s: (tid[s.track], s.start_ns, s.end_ns)):
        duration = piece.end_ns - piece.start_ns
        args: dict[str, object] = {"bytes": piece.nbytes}
        if piece.op >= 0:
            op = trace.ops[piece.op]
            name = f"{op.layer}: {op.module or op.name} ({op.name})"
            args |= {"op": piece.op, "kind": op.kind, "layer": op.layer}
            if compute_ns.get(piece.op) and not piece.track.endswith(".dma") and \
                    _ORDER.match(piece.track):
                args["operations"] = op.ops * duration / compute_ns[piece.op]
        else:
            name = "host input"
        events.append({"ph": "X", "name": name, "pid": 1, "tid": tid[piece.track],
                       "ts": piece.start_ns / 1e3, "dur": duration / 1e3, "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"hardware": hw.name, "model": trace.model, "phase": trace.phase,
                          "time_unit": "us"}}


def to_json(hw: Hardware, trace: Trace, timeline: Timeline) -> str:
    return json.dumps(chrome_trace(hw, trace, timeline), sort_keys=True,
                      separators=(",", ":"))


def _name(pid: int, tid: int, name: str) -> list[dict[str, object]]:
    """Metadata events naming a process (tid 0) or a thread."""
    kind = "process_name" if tid == 0 else "thread_name"
    events: list[dict[str, object]] = [{"ph": "M", "name": kind, "pid": pid, "tid": tid,
                                        "args": {"name": name}}]
    if tid:
        events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                       "args": {"sort_index": tid}})
    return events


def _slice(pid: int, tid: int, name: str, start_ns: float, end_ns: float,
           args: dict[str, object]) -> dict[str, object]:
    return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": start_ns / 1e3,
            "dur": (end_ns - start_ns) / 1e3, "args": args}


def system_chrome_trace(title: str, devices: int, group: int, pp: int,
                        chunks: list[Trace], timelines: list[Timeline],
                        runs: tuple[tuple[int, int, float, float], ...],
                        sends: tuple[tuple[int, int, float, float], ...],
                        note: str = "") -> dict[str, object]:
    """The trace-event JSON object of one step on a system: `devices` devices of a replica
    in stages of `group`; `chunks` the virtual stages' device traces with their
    `timelines`, run as `runs` and handed over as `sends` (micro-batch, virtual stage,
    start ns, end ns)."""
    events: list[dict[str, object]] = []
    for device in range(devices):
        pid, stage = device + 1, device // group
        events += _name(pid, 0, f"device {device} (stage {stage}, rank {device % group})"
                        + (f" {note}" if note else ""))
        events += _name(pid, 1, "ops") + _name(pid, 2, "links")
        for mb, c, start, _ in runs:
            if c % pp != stage:
                continue
            timeline = timelines[c]
            for i, op in enumerate(chunks[c].ops):
                events.append(_slice(
                    pid, 2 if op.kind == "collective" else 1, _label(op),
                    start + timeline.op_start_ns[i], start + timeline.op_end_ns[i],
                    {"micro_batch": mb, "virtual_stage": c, "kind": op.kind,
                     "bytes": op.bytes}))
    pid = devices + 1
    events += _name(pid, 0, "links between stages")
    for c in sorted({c for _, c, _, _ in sends}):
        events += _name(pid, c + 1, f"virtual stage {c} → {c + 1} (stage {c % pp} → "
                                    f"{(c + 1) % pp})")
    events += [_slice(pid, c + 1, f"hand-over, micro-batch {mb}", start, end,
                      {"micro_batch": mb}) for mb, c, start, end in sends]
    events.sort(key=lambda e: (e["ph"] != "M", e["pid"], e["tid"], e.get("ts", 0.0)))
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"run": title, "time_unit": "us"}}


def _label(op: Op) -> str:
    return f"{op.layer}: {op.module or op.name} ({op.name})"
