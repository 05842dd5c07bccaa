"""Serving metrics: per-request latencies and their summary (definitions as Vidur's and
vLLM's benchmark_serving.py: TTFT = first token − arrival; TPOT = (finish − first token) /
(output tokens − 1); end-to-end = finish − arrival; queueing = first scheduled − arrival)."""

from __future__ import annotations

import numpy as np

from simulator.serving.schedulers.base import Running

PERCENTILES = (50, 90, 99)


def spread(values: list[float]) -> dict[str, float]:
    """{mean, p50, p90, p99} of `values` (numpy's linear percentiles); zeros when empty."""
    if not values:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    data = np.asarray(values, dtype=float)
    return {"mean": float(data.mean()),
            **{f"p{p}": float(np.percentile(data, p)) for p in PERCENTILES}}


def per_request(seq: Running) -> dict[str, float | int]:
    """One finished request's times (s) and counts."""
    r = seq.request
    assert seq.first_token_s is not None and seq.finish_s is not None
    assert seq.scheduled_s is not None
    return {"id": r.id, "arrival_s": r.arrival_s, "prompt_tokens": r.prompt,
            "output_tokens": r.output, "queue_s": seq.scheduled_s - r.arrival_s,
            "ttft_s": seq.first_token_s - r.arrival_s,
            "tpot_s": ((seq.finish_s - seq.first_token_s) / (r.output - 1)
                       if r.output > 1 else 0.0),
            "e2e_s": seq.finish_s - r.arrival_s, "preemptions": seq.preemptions,
            "replica": seq.replica}
