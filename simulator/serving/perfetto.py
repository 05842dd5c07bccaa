"""A serving run as a Chrome/Perfetto trace (JSON; open it at ui.perfetto.dev).

One process per replica with a `steps` track (each step named by its kind and batch);
one `requests` process with a track per request: its queueing (arrival → first
scheduled), its first token (→ first token) and its decoding (→ last token). Times in
microseconds.
"""

from __future__ import annotations

import json

from simulator.serving.loop import ServeResult


def _meta(kind: str, pid: int, tid: int, name: str) -> dict[str, object]:
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def _slice(pid: int, tid: int, name: str, start_s: float, end_s: float,
           args: dict[str, object]) -> dict[str, object]:
    return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": start_s * 1e6,
            "dur": (end_s - start_s) * 1e6, "args": args}


def chrome_trace(done: ServeResult, title: str) -> dict[str, object]:
    """The trace-event object of a run recorded with `Options.record_steps`."""
    replicas = done.summary["replicas"]
    events: list[dict[str, object]] = []
    for replica in range(replicas):
        events += [_meta("process_name", replica + 1, 0, f"replica {replica}"),
                   _meta("thread_name", replica + 1, 1, "steps")]
    events += [_slice(s.replica + 1, 1, f"{s.kind} ×{s.sequences}", s.start_s, s.end_s,
                      {"sequences": s.sequences, "kv_blocks_used": s.kv_blocks_used})
               for s in done.steps]
    pid = replicas + 1
    events.append(_meta("process_name", pid, 0, "requests"))
    for row in done.requests:
        tid = int(row["id"]) + 1
        arrival = float(row["arrival_s"])
        scheduled = arrival + float(row["queue_s"])
        first = arrival + float(row["ttft_s"])
        finish = arrival + float(row["e2e_s"])
        args: dict[str, object] = {"replica": row["replica"], "prompt": row["prompt_tokens"],
                                   "output": row["output_tokens"],
                                   "preemptions": row["preemptions"]}
        events.append(_meta("thread_name", pid, tid, f"request {row['id']}"))
        events += [_slice(pid, tid, "queued", arrival, scheduled, args),
                   _slice(pid, tid, "first token", scheduled, first, args),
                   _slice(pid, tid, "decoding", first, finish, args)]
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"run": title, "time_unit": "us"}}


def to_json(done: ServeResult, title: str) -> str:
    return json.dumps(chrome_trace(done, title), sort_keys=True, separators=(",", ":"))
