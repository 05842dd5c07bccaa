"""Engine invariants on synthetic machines and ops."""

from typing import Any

import pytest
from engine_helpers import machine, op, trace_of

from simulator.api import run_trace
from simulator.engine import simulate_tasks
from simulator.mapping import map_trace


def run(data: dict[str, Any], *ops: Any, mapping: str = "tensor", batch: int = 1,
        granularity: int = 8) -> float:
    hw = machine(data)
    tasks = map_trace(trace_of(*ops, batch=batch), hw, mapping, granularity)  # type: ignore[arg-type]
    return simulate_tasks(hw, tasks).makespan_ns


def test_single_tile_time_is_cycles_over_clock(machine_data: dict[str, Any]) -> None:
    machine_data["cores"]["count"] = 1
    # 6400 FLOPs at 64 FLOPs/cycle = 100 cycles at 100 MHz = 1000 ns
    assert run(machine_data, op(0, ops=6400)) == pytest.approx(1000.0)
    machine_data["cores"]["units"]["mac"]["latency"] = "7 cycle"
    assert run(machine_data, op(0, ops=6400)) == pytest.approx(1070.0)
    machine_data["clock"] = "200 MHz"
    assert run(machine_data, op(0, ops=6400)) == pytest.approx(535.0)


def test_compute_splits_across_cores(machine_data: dict[str, Any]) -> None:
    machine_data["cores"]["count"] = 4
    assert run(machine_data, op(0, ops=6400 * 4, parallel=4)) == pytest.approx(1000.0)


def test_two_cores_on_one_channel_are_slower_than_on_two(machine_data: dict[str, Any]) -> None:
    memory_bound = op(0, ops=64, weight_bytes=1 << 20, parallel=2)
    machine_data["memory"]["dram"]["access_width"] = "512 bit"  # port 6.4 GB/s: channel-bound
    machine_data["memory"]["dram"]["channels"] = 2
    two = run(machine_data, memory_bound)
    machine_data["memory"]["dram"]["channels"] = 1
    one = run(machine_data, memory_bound)
    assert one > 1.8 * two
    # 1 MiB at 1 GB/s is ≈ 1.05 ms on one channel, half that on two
    assert one == pytest.approx((1 << 20) / 1e9 * 1e9, rel=0.02)


def test_narrow_port_limits_a_core_below_channel_bandwidth(machine_data: dict[str, Any]) -> None:
    machine_data["cores"]["count"] = 1
    machine_data["memory"]["dram"]["access_width"] = "8 bit"
    # 1 byte per 10 ns cycle: 100 MB/s, far below the 1 GB/s channel
    time = run(machine_data, op(0, ops=64, weight_bytes=100_000))
    assert time == pytest.approx(100_000 * 10, rel=0.02)


def test_dependencies_serialise_and_independent_ops_overlap(machine_data: dict[str, Any]) -> None:
    machine_data["cores"]["count"] = 1
    machine_data["cores"]["units"]["vec2"] = {"kind": "vector", "ops_per_cycle": {"bf16": 4},
                                              "handles": ["activation"]}
    machine_data["power"]["op_energy"]["vector"] = {"default": "1 pJ"}
    a = op(0, ops=6400)
    b_dep = op(1, kind="activation", ops=400, deps=(0,))
    b_free = op(1, kind="activation", ops=400)
    serial = run(machine_data, a, b_dep)
    machine_data["scheduling"] = {"overlap_ops": True}
    overlapped = run(machine_data, a, b_free)
    assert serial == pytest.approx(2000.0)
    assert overlapped == pytest.approx(1000.0)


def test_double_buffering_overlaps_load_and_compute(machine_data: dict[str, Any]) -> None:
    machine_data["cores"]["count"] = 1
    machine_data["memory"]["dram"]["channels"] = 1
    machine_data["memory"]["dram"]["access_width"] = "512 bit"  # channel-bound loads
    machine_data["cores"]["sram"] = "4 KiB"  # 2 KiB tiles: 32 of them
    # load 64 KiB (65.5 µs at 1 GB/s) and compute 65.5 µs: overlapped they take ≈ 1×, not 2×
    balanced = op(0, ops=int(65536e-9 * 100e6 * 64), weight_bytes=65536)
    fine = run(machine_data, balanced, granularity=64)
    coarse = run(machine_data, balanced, granularity=1)
    assert coarse == pytest.approx(2 * 65536, rel=0.02)
    assert fine == pytest.approx(65536 * (1 + 1 / 32), rel=0.02)  # one tile not overlapped


def test_batch_mapping_keeps_latency_and_multiplies_throughput(
        machine_data: dict[str, Any]) -> None:
    machine_data["cores"]["count"] = 4
    machine_data["memory"]["dram"]["channels"] = 4
    hw = machine(machine_data)
    # a trace of batch B carries B times the work; every core streams the same weights
    one, _, _ = run_trace(hw, trace_of(op(0, ops=6400, weight_bytes=1000), batch=1), "batch")
    four, _, _ = run_trace(hw, trace_of(op(0, ops=4 * 6400, weight_bytes=1000), batch=4),
                           "batch")
    assert four.latency_s == pytest.approx(one.latency_s)
    assert four.tokens_per_s == pytest.approx(4 * one.tokens_per_s)


def test_layer_latencies_sum_to_total(machine_data: dict[str, Any]) -> None:
    hw = machine(machine_data)
    ops = [op(0, ops=6400, layer="embed"), op(1, ops=640, deps=(0,), layer="layers.0"),
           op(2, ops=64000, deps=(1,), layer="layers.1", weight_bytes=4096)]
    result, _, _ = run_trace(hw, trace_of(*ops))
    assert [layer.name for layer in result.layers] == ["embed", "layers.0", "layers.1"]
    assert sum(layer.latency_s for layer in result.layers) == pytest.approx(result.latency_s)


def test_launch_overhead_is_serial(machine_data: dict[str, Any]) -> None:
    machine_data["cores"]["count"] = 1
    machine_data["overheads"] = {"launch": "2 us"}
    assert run(machine_data, op(0, ops=6400), op(1, ops=6400)) == pytest.approx(2 * 3000.0)


def test_one_stream_replay_equals_simulating_every_op() -> None:
    """Ops that recur on a one-stream machine are simulated once: same timeline."""
    from simulator.engine.simulation import _Run
    from simulator.hardware import load_hardware
    from simulator.workload.cache import get_trace
    from workloads.config import resolve_model

    hw = load_hardware("gpu_a100.yaml")
    trace = get_trace(resolve_model("tiny-llama"), "prefill", 2, 0, 96)
    tasks = map_trace(trace, hw)
    replayed = simulate_tasks(hw, tasks, 64.0, record=True)
    full = _Run(hw, tasks, record=True).run(64.0)
    assert replayed.events < full.events
    assert replayed.makespan_ns == pytest.approx(full.makespan_ns, rel=1e-12)
    assert replayed.op_end_ns == pytest.approx(full.op_end_ns, rel=1e-12)
    assert replayed.op_start_ns == pytest.approx(full.op_start_ns, rel=1e-12)
    assert replayed.usage.busy_ns == pytest.approx(full.usage.busy_ns, rel=1e-12)
    assert replayed.usage.dram_bytes == pytest.approx(full.usage.dram_bytes, rel=1e-12)
    key = lambda s: (s.track, s.op, round(s.start_ns, 3), round(s.end_ns, 3))  # noqa: E731
    assert sorted(map(key, replayed.slices)) == sorted(map(key, full.slices))


def test_recurring_ops_are_mapped_once_with_their_own_identity() -> None:
    from simulator.hardware import load_hardware
    from simulator.mapping import map_op
    from simulator.workload.cache import get_trace
    from workloads.config import resolve_model

    hw = load_hardware("fpga_8core.yaml")
    trace = get_trace(resolve_model("tiny"), "decode", 1, 16, 0)
    tasks = map_trace(trace, hw)
    assert [task.op for task in tasks] == list(trace.ops)
    assert [task.stages for task in tasks] == [
        map_op(o, hw, "tensor", 1, 8).stages for o in trace.ops]


def test_what_a_machine_keeps_across_calls_does_not_change_results() -> None:
    """Mapped ops and ops run alone are kept per machine object (simulator.engine.memo): a
    step simulated after others, on a fresh machine, and without detail agrees bit for bit."""
    from simulator.api import simulate
    from simulator.engine import memo
    from simulator.hardware import load_hardware
    def to_json(result: Any) -> str:
        return result.to_json(with_ops=True)

    hw = load_hardware("gpu_a100.yaml")
    first = to_json(simulate(hw, "tiny-llama", phase="decode", batch=4, context=200))
    for batch, context in ((4, 120), (3, 200), (8, 64)):
        simulate(hw, "tiny-llama", phase="decode", batch=batch, context=context)
    again = simulate(hw, "tiny-llama", phase="decode", batch=4, context=200)
    assert to_json(again) == first
    fresh = load_hardware("gpu_a100.yaml")
    assert to_json(simulate(fresh, "tiny-llama", phase="decode", batch=4, context=200)) == first
    assert memo.table(fresh, "alone") is not memo.table(hw, "alone")
    lean = simulate(hw, "tiny-llama", phase="decode", batch=4, context=200, detail=False)
    assert lean.ops == () and lean.layers == ()
    assert (lean.latency_s, lean.energy_j, lean.events) == (
        again.latency_s, again.energy_j, again.events)
