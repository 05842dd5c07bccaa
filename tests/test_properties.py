"""Invariants over random machines and op chains (hypothesis)."""

import copy
from typing import Any

from conftest import BASE_MACHINE
from engine_helpers import machine, op, trace_of
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.api import run_trace

ops_strategy = st.lists(
    st.tuples(st.integers(1, 200_000), st.integers(0, 300_000), st.integers(1, 8)),
    min_size=1, max_size=6)


def chain(specs: list[tuple[int, int, int]]) -> Any:
    return trace_of(*(op(i, ops=o, weight_bytes=w, parallel=p, deps=(i - 1,) if i else ())
                      for i, (o, w, p) in enumerate(specs)))


def latency(data: dict[str, Any], specs: list[tuple[int, int, int]]) -> float:
    return run_trace(machine(data), chain(specs))[0].latency_s


@settings(max_examples=25, deadline=None)
@given(specs=ops_strategy, cores=st.integers(1, 6), channels=st.integers(1, 4),
       factor=st.sampled_from([1.5, 2, 4]))
def test_more_bandwidth_clock_or_channels_is_never_slower(
        specs: list[tuple[int, int, int]], cores: int, channels: int, factor: float) -> None:
    data = copy.deepcopy(BASE_MACHINE)
    data["cores"]["count"] = cores
    data["memory"]["dram"]["channels"] = channels
    base = latency(data, specs)
    faster = copy.deepcopy(data)
    faster["memory"]["dram"]["bandwidth_per_channel"] = f"{factor} GB/s"
    assert latency(faster, specs) <= base * (1 + 1e-9)
    faster = copy.deepcopy(data)
    faster["clock"] = f"{100 * factor} MHz"
    assert latency(faster, specs) <= base * (1 + 1e-9)
    faster = copy.deepcopy(data)
    faster["memory"]["dram"]["channels"] = channels * 2
    assert latency(faster, specs) <= base * (1 + 1e-9)


@settings(max_examples=25, deadline=None)
@given(specs=ops_strategy, batch=st.integers(1, 8))
def test_energy_positive_and_layers_sum(specs: list[tuple[int, int, int]], batch: int) -> None:
    result = run_trace(machine(copy.deepcopy(BASE_MACHINE)), chain(specs))[0]
    assert result.energy_j > 0 and result.power_w > 0
    assert abs(sum(layer.latency_s for layer in result.layers) - result.latency_s) < 1e-12
    assert result.dram_bytes >= sum(w for _, w, _ in specs) * (1 - 1e-9)
