"""The Result of a simulation and its renderings: rich table, JSON, CSV, DataFrames.

Units are in the field names (`_s`, `_w`, `_j`, `_bytes`); the JSON is deterministic
(sorted keys, no wall-clock values), so the same inputs give byte-identical output.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from simulator.engine import Timeline
from simulator.engine.machine import channel_bandwidth
from simulator.hardware.schema import Hardware
from simulator.mapping import Task
from simulator.power import Energy
from simulator.workload.trace import Trace

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class LayerResult:
    name: str
    latency_s: float
    energy_j: float


@dataclass(frozen=True)
class OpResult:
    index: int
    name: str
    kind: str
    module: str
    layer: str
    unit: str
    cores: int
    start_s: float
    end_s: float
    ops: int
    dram_bytes: float
    energy_j: float


@dataclass(frozen=True)
class CollectiveShare:
    """The collectives of one kind and size a device of a pipeline stage runs per step."""

    stage: int
    collective: str
    bytes: int
    count: int
    time_s: float


@dataclass(frozen=True)
class SystemShare:
    """How a step was spread over a system: the devices, the degrees of parallelism, what
    one device holds, and the time on the links. `communication_s` is the link time on one
    micro-batch's path through the stages (its collectives and the stage-to-stage sends);
    `communication_share` is that over the path's whole time."""

    system: str
    devices: int
    #: data-parallel replicas (each on its share of the batch)
    dp: int
    tp: int
    #: sequence-parallel devices (Ulysses)
    sp: int
    pp: int
    #: virtual stages per pipeline stage (1: not interleaved)
    interleave: int
    ep: int
    #: expert parallelism's runtime (combine or coherent); None without it
    ep_mode: str | None
    micro_batches: int
    device_memory_bytes: int
    device_weights_bytes: int
    device_state_bytes: int
    stage_latency_s: tuple[float, ...]
    bubble_fraction: float
    communication_s: float
    communication_share: float
    collectives: tuple[CollectiveShare, ...]


@dataclass(frozen=True)
class Result:
    """Projected performance of one model step on one machine."""

    hardware: str
    model: str
    phase: str
    mapping: str
    #: host runtime the kernels are launched under (eager, cuda_graphs); None: no host runtime
    runtime: str | None
    batch: int
    context: int
    prompt: int
    tokens: int
    latency_s: float
    tokens_per_s: float
    power_w: float
    energy_j: float
    energy_per_token_j: float
    memory_bytes: int
    weights_bytes: int
    state_bytes: int
    activation_bytes: int
    dram_bytes: float
    host_transfer_s: float
    #: host launch time the step paid (eager: before each kernel; cuda_graphs: the graph
    #: launch and the gaps before its kernels); on a system, one device's
    launch_s: float
    #: per DRAM channel (and the L2): share of the run it was held, bursts included
    channel_utilisation: dict[str, float]
    #: the same tracks: useful bytes moved / (bandwidth it sustains × latency)
    channel_useful_utilisation: dict[str, float]
    events: int
    layers: tuple[LayerResult, ...]
    ops: tuple[OpResult, ...] = field(repr=False)
    notes: tuple[str, ...] = ()
    #: MoE models: the busiest expert's tokens over the fewest it could have, ⌈T·k / E⌉ (1.0:
    #: balanced), in the MoE block where that is largest; None for dense models
    expert_imbalance: float | None = None
    #: a run on a system of several devices (simulator.parallel); None: one chip
    system: SystemShare | None = None

    def to_dict(self, with_ops: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not with_ops:
            data.pop("ops")
        if self.system is None:
            data.pop("system")  # one chip: the contract it always had
        return data

    def to_json(self, with_ops: bool = False) -> str:
        return json.dumps(self.to_dict(with_ops), sort_keys=True, indent=2)

    def layers_frame(self) -> pd.DataFrame:
        import pandas as pd  # on demand: it costs a second of start-up

        return pd.DataFrame([asdict(layer) for layer in self.layers])

    def ops_frame(self) -> pd.DataFrame:
        import pandas as pd

        frame = pd.DataFrame([asdict(op) for op in self.ops])
        frame["latency_s"] = frame["end_s"] - frame["start_s"]
        return frame

    def to_csv(self) -> str:
        """Per-layer rows plus a total row, with the run's identity on every row."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["hardware", "model", "phase", "mapping", "batch", "context", "prompt",
                         "layer", "latency_s", "energy_j", "tokens_per_s", "power_w"])
        ident = [self.hardware, self.model, self.phase, self.mapping, self.batch, self.context,
                 self.prompt]
        for layer in self.layers:
            writer.writerow([*ident, layer.name, repr(layer.latency_s), repr(layer.energy_j), "",
                             ""])
        writer.writerow([*ident, "total", repr(self.latency_s), repr(self.energy_j),
                         repr(self.tokens_per_s), repr(self.power_w)])
        return out.getvalue()


def _layer_latencies(trace: Trace, timeline: Timeline) -> list[tuple[str, float, float]]:
    """(layer, latency, end) with latencies as differences of completion times (they sum up)."""
    ends: dict[str, float] = {}
    for op, end in zip(trace.ops, timeline.op_end_ns, strict=True):
        ends[op.layer] = max(ends.get(op.layer, 0.0), end)
    rows, previous = [], 0.0
    for name in trace.layers():
        end = max(previous, ends[name])
        rows.append((name, (end - previous) * 1e-9, end))
        previous = end
    return rows


def _useful_shares(hw: Hardware, timeline: Timeline, tracks: list[str]) -> dict[str, float]:
    """Useful bytes each track moved over what it could move in the run; below the busy
    share where accesses narrower than a burst hold the channel for the whole burst."""
    span_s = timeline.makespan_ns * 1e-9
    moved = timeline.usage.track_bytes
    return {track: moved.get(track, 0.0) / (
        hw.memory.l2.bandwidth if track == "l2" and hw.memory.l2 else channel_bandwidth(hw)
    ) / span_s for track in tracks}


def build_result(hw: Hardware, trace: Trace, tasks: list[Task], timeline: Timeline,
                 energy: Energy, mapping: str, notes: tuple[str, ...] = (),
                 detail: bool = True) -> Result:
    """Assemble the Result of one simulated step (`detail`: with its layers and ops)."""
    latency = timeline.makespan_ns * 1e-9
    static_w = energy.static_j / latency if latency else 0.0
    dynamic: dict[str, float] = {}
    for op, joules in zip(trace.ops, energy.per_op_j, strict=True) if detail else ():
        dynamic[op.layer] = dynamic.get(op.layer, 0.0) + joules
    layers = tuple(LayerResult(name, lat, dynamic.get(name, 0.0) + static_w * lat)
                   for name, lat, _ in _layer_latencies(trace, timeline)) if detail else ()
    ops = () if not detail else tuple(
        OpResult(index=op.index, name=op.name, kind=op.kind, module=op.module, layer=op.layer,
                 unit=task.parts[0].unit if task.parts else "links", cores=task.cores,
                 start_s=start * 1e-9, end_s=end * 1e-9, ops=op.ops,
                 dram_bytes=sum((p.dram_load_bytes + p.dram_store_bytes) * p.size
                                for p in task.parts), energy_j=joules)
        for op, task, start, end, joules in zip(trace.ops, tasks, timeline.op_start_ns,
                                                timeline.op_end_ns, energy.per_op_j,
                                                strict=True))
    counted = trace.tokens
    busy = {track: ns / timeline.makespan_ns for track, ns in sorted(timeline.usage.busy_ns.items())
            if track.startswith("dram") or track == "l2"} if timeline.makespan_ns else {}
    return Result(
        hardware=hw.name, model=trace.model, phase=trace.phase, mapping=mapping,
        runtime=hw.overheads.runtime,
        batch=trace.batch, context=trace.context, prompt=trace.prompt, tokens=counted,
        latency_s=latency, tokens_per_s=counted / latency if latency else 0.0,
        power_w=energy.total_j / latency if latency else 0.0, energy_j=energy.total_j,
        energy_per_token_j=energy.total_j / counted,
        memory_bytes=trace.weights_bytes + trace.state_bytes + trace.activation_bytes,
        weights_bytes=trace.weights_bytes, state_bytes=trace.state_bytes,
        activation_bytes=trace.activation_bytes, dram_bytes=timeline.usage.dram_bytes,
        host_transfer_s=timeline.usage.busy_ns.get("host", 0.0) * 1e-9,
        launch_s=timeline.usage.busy_ns.get("launch", 0.0) * 1e-9,
        channel_utilisation=busy,
        channel_useful_utilisation=_useful_shares(hw, timeline, list(busy)),
        events=timeline.events, layers=layers, ops=ops, notes=notes,
        expert_imbalance=max((max(row) / -(-sum(row) // len(row)) for row in trace.expert_tokens
                              if sum(row)), default=None))
