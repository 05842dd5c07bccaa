"""Serving workloads: arrival processes, length distributions and request traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulator.errors import UserError
from simulator.serving.requests import load_spec, make_requests


def _gaps(requests: list) -> np.ndarray:
    return np.diff([r.arrival_s for r in requests])


def test_arrival_processes_have_their_rate_and_spread_and_repeat_by_seed() -> None:
    n = 20_000
    poisson = make_requests(load_spec({"rate": "4 /s", "num_requests": n, "seed": 3}, "spec"))
    assert poisson == make_requests(load_spec({"rate": "240 /min", "num_requests": n,
                                               "seed": 3}, "spec"))  # same rate, same draw
    gaps = _gaps(poisson)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)
    assert poisson[0].arrival_s == 0.0
    bursty = _gaps(make_requests(load_spec({"arrival": "gamma", "rate": "4 /s", "cv": 3,
                                            "num_requests": n}, "spec")))
    assert bursty.mean() == pytest.approx(0.25, rel=0.1)
    assert bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.1)
    fixed = make_requests(load_spec({"arrival": "fixed", "rate": "10 /s", "num_requests": 5},
                                    "spec"))
    assert [r.arrival_s for r in fixed] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4], abs=1e-12)
    burst = make_requests(load_spec({"arrival": "burst", "num_requests": 32, "prompt": 8,
                                     "output": 504}, "spec"))
    assert {(r.arrival_s, r.prompt, r.output) for r in burst} == {(0.0, 8, 504)}
    assert make_requests(load_spec({"rate": "4 /s", "num_requests": 50, "seed": 4}, "s")) != \
        make_requests(load_spec({"rate": "4 /s", "num_requests": 50, "seed": 5}, "s"))


def test_length_distributions_stay_in_bounds() -> None:
    spec = {"arrival": "burst", "num_requests": 5000,
            "prompt": {"dist": "uniform", "low": 10, "high": 20},
            "output": {"dist": "zipf", "exponent": 1.2, "low": 1, "high": 100}}
    requests = make_requests(load_spec(spec, "spec"))
    prompts = np.array([r.prompt for r in requests])
    outputs = np.array([r.output for r in requests])
    assert prompts.min() == 10 and prompts.max() == 20
    assert outputs.min() >= 1 and outputs.max() <= 100
    counts = np.bincount(outputs, minlength=101)
    assert counts[1] > counts[2] > counts[10] > counts[100]  # Zipf: falls with length


def test_azure_and_vidur_traces_are_read(tmp_path: Path) -> None:
    azure = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:46.6805900,374,44\n"
                     "2023-11-16 18:15:50.9951690,396,109\n"
                     "2023-11-16 18:15:51.0000000,879,37\n")
    requests = make_requests(load_spec({"arrival": "trace", "prompt": "trace",
                                        "output": "trace", "trace": str(azure)}, "spec"))
    assert [r.prompt for r in requests] == [374, 396, 879]
    assert [r.arrival_s for r in requests] == pytest.approx([0.0, 4.314579, 4.319410],
                                                            abs=1e-6)
    vidur = tmp_path / "splitwise_conv.csv"
    vidur.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,100,10\n"
                     "0.75,200,20\n")
    requests = make_requests(load_spec({"arrival": "trace", "prompt": "trace",
                                        "output": 64, "trace": str(vidur)}, "spec"))
    assert [(r.arrival_s, r.prompt, r.output) for r in requests] == [(0.0, 100, 64),
                                                                     (0.25, 200, 64)]
    lengths = tmp_path / "sharegpt_stats.csv"
    lengths.write_text("num_prefill_tokens,num_decode_tokens,pd_ratio\n30,40,0.75\n"
                       "50,60,0.8\n")
    requests = make_requests(load_spec({"rate": "2 /s", "prompt": "trace", "output": "trace",
                                        "trace": str(lengths)}, "spec"))
    assert [(r.prompt, r.output) for r in requests] == [(30, 40), (50, 60)]


@pytest.mark.parametrize(("spec", "trace", "field"), [
    ({"rate": "0 /s", "num_requests": 3}, None, "rate"),
    ({"rate": 4, "num_requests": 3}, None, "rate"),
    ({"rate": "4 GB/s", "num_requests": 3}, None, "rate"),
    ({"num_requests": 3}, None, "rate"),
    ({"rate": "4 /s", "num_requests": 0}, None, "num_requests"),
    ({"rate": "4 /s", "num_requests": 3, "prompts": 5}, None, "prompts"),
    ({"rate": "4 /s", "num_requests": 3, "prompt": -5}, None, "prompt"),
    ({"rate": "4 /s", "num_requests": 3, "output": {"dist": "uniform", "low": 9, "high": 2}},
     None, "output"),
    ({"arrival": "trace"}, "ContextTokens,GeneratedTokens\n3,4\n", "arrival"),
    ({"arrival": "trace"}, "when,prompt\n1,2\n", "TIMESTAMP"),
    ({"arrival": "trace"}, "arrived_at,num_prefill_tokens,num_decode_tokens\n2,3,4\n1,3,4\n",
     ":3"),
    ({"arrival": "trace", "prompt": "trace"},
     "arrived_at,num_prefill_tokens,num_decode_tokens\n1,-3,4\n", ":2"),
    ({"arrival": "trace", "num_requests": 9},
     "arrived_at,num_prefill_tokens,num_decode_tokens\n1,3,4\n", "num_requests"),
])
def test_bad_workloads_are_one_line_errors_naming_the_field(
        tmp_path: Path, spec: dict, trace: str | None, field: str) -> None:
    if trace is not None:
        path = tmp_path / "t.csv"
        path.write_text(trace)
        spec = {**spec, "trace": str(path)}
    with pytest.raises(UserError) as info:
        make_requests(load_spec(spec, "spec"))
    text = str(info.value)
    assert field in text and "\n" not in text, text
