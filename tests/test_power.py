"""Power arithmetic: static × time + ops × energy/op + bytes × energy/byte."""

from typing import Any

import pytest
from engine_helpers import machine, op, trace_of

from simulator.api import run_trace


def test_energy_adds_static_compute_and_dram(machine_data: dict[str, Any]) -> None:
    machine_data["cores"]["count"] = 1
    machine_data["memory"]["dram"]["channels"] = 1
    hw = machine(machine_data)
    ops, weights = 6400, 8000
    result, _, timeline = run_trace(hw, trace_of(op(0, ops=ops, weight_bytes=weights)))
    seconds = timeline.makespan_ns * 1e-9
    static = (10 + 1) * seconds  # idle 10 W + one core 1 W
    compute = ops * 1e-12  # 1 pJ per matrix op
    dram = weights * 10e-12  # 10 pJ per byte, 8-byte accesses fill 8-byte bursts
    assert result.energy_j == pytest.approx(static + compute + dram)
    assert result.power_w == pytest.approx(result.energy_j / result.latency_s)
    assert result.energy_per_token_j == pytest.approx(result.energy_j)


def test_narrow_accesses_pay_for_whole_bursts(machine_data: dict[str, Any]) -> None:
    machine_data["cores"]["count"] = 1
    machine_data["power"]["idle"] = "0 W"
    machine_data["power"]["per_core"] = "0 W"
    machine_data["power"]["op_energy"]["matrix"] = {"default": "0 pJ"}
    wide = run_trace(machine(machine_data), trace_of(op(0, ops=1, weight_bytes=800)))[0]
    machine_data["memory"]["dram"]["access_width"] = "8 bit"
    narrow = run_trace(machine(machine_data), trace_of(op(0, ops=1, weight_bytes=800)))[0]
    assert wide.energy_j == pytest.approx(800 * 10e-12)
    assert narrow.energy_j == pytest.approx(8 * wide.energy_j)


def test_energy_per_token_divides_by_batch(machine_data: dict[str, Any]) -> None:
    hw = machine(machine_data)
    result = run_trace(hw, trace_of(op(0, ops=6400), batch=2), "batch")[0]
    assert result.energy_per_token_j == pytest.approx(result.energy_j / 2)
    assert sum(layer.energy_j for layer in result.layers) == pytest.approx(result.energy_j)
