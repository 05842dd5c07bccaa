"""A simulated run as a Chrome/Perfetto trace (JSON): open it at ui.perfetto.dev.

One process for the chip; one track (thread) per core functional unit, per core's
load-store port (its DMA engine), per DRAM channel, the L2 and the host link. Each slice
is named by its op and layer and carries bytes and operations; times in microseconds.
Grouped cores (identical work) appear on the track of the group's first core.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

from simulator.engine import Timeline
from simulator.hardware.schema import Hardware
from simulator.workload.trace import Trace

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
