"""Run mapped tasks on a Machine as SimPy processes and record what happened.

Every op's time comes out of the event simulation: a part streams its chunks through
load (DRAM and/or L2) → compute (its unit) → store, with one chunk loading while the
previous computes (double buffering). A task starts when its producers are done (all
their parts under tensor mapping; the same lane under batch mapping), after a serial
launch overhead; without `overlap_ops` it also waits for the previous op (one stream).
The launch overhead follows the machine's runtime (`overheads.runtime`): eager pays
`launch` before every kernel; cuda_graphs pays `graph_launch` once per step, after the
host's input, and `graph_kernel_gap` before every kernel. The launch time paid is kept
(usage track `launch`).

On one stream each op starts on an idle machine, so its timing depends on its kernels
alone: each distinct op is simulated once and replayed wherever it recurs (every layer of
a prefill after the first), which gives the same timeline as simulating them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import simpy

from simulator.engine.machine import (
    Fifo,
    Machine,
    Process,
    Slice,
    Tokens,
    Usage,
    turnaround_factor,
)
from simulator.hardware.schema import Hardware
from simulator.mapping import Part, Task


@dataclass
class Timeline:
    """The result of a run: when each op started and ended, and resource usage."""

    makespan_ns: float
    op_start_ns: list[float]
    op_end_ns: list[float]
    usage: Usage
    events: int
    slices: list[Slice] = field(default_factory=list)


def launch_costs(hw: Hardware) -> tuple[float, float]:
    """(ns before each kernel, ns once per step) under the machine's runtime."""
    overheads, clock = hw.overheads, hw.core_clock
    if overheads.runtime == "cuda_graphs":
        assert overheads.graph_launch is not None  # the schema requires it
        return overheads.graph_kernel_gap.ns(clock), overheads.graph_launch.ns(clock)
    return overheads.launch.ns(clock), 0.0


class _Run:
    def __init__(self, hw: Hardware, tasks: list[Task], record: bool) -> None:
        self.env = simpy.Environment()
        self.machine = Machine(self.env, hw, record)
        self.hw, self.tasks, self.record = hw, tasks, record
        self.launch_ns, self.step_launch_ns = launch_costs(hw)
        self.barrier_ns = hw.overheads.barrier.ns(hw.core_clock)
        self.issue_ns = hw.cores.issue.ns(hw.core_clock)
        self.stages = hw.cores.pipeline_stages
        self.launcher = Fifo(self.env)
        self.done: list[simpy.Event] = []
        self.part_done: list[list[simpy.Event]] = []
        self.start = [0.0] * len(tasks)
        self.end = [0.0] * len(tasks)
        self.slices: list[Slice] = []
        self.events = 0

    def _timeout(self, ns: float) -> simpy.Event:
        self.events += 1
        return self.env.timeout(ns)

    def _step_start(self, host_bytes: float) -> Process:
        """The host's input, then the step's one graph launch (cuda_graphs)."""
        yield self.env.process(self.machine.host_transfer(host_bytes))
        self.machine.usage.add("launch", self.step_launch_ns)
        yield self._timeout(self.step_launch_ns)

    def _part(self, index: int, part: Part, ready: simpy.Event) -> Process:
        yield ready
        env, machine = self.env, self.machine
        if self.issue_ns:
            yield self._timeout(self.issue_ns)
        unit = machine.units[(part.cores[0], part.unit)]
        chunks = part.chunks
        load = part.dram_load_bytes / chunks
        store = part.dram_store_bytes / chunks
        l2 = part.l2_bytes / chunks
        compute = part.compute_ns / chunks
        mix = turnaround_factor(self.hw, part.dram_load_bytes, part.dram_store_bytes)
        arrived = slots = None
        if load or l2:  # a pipeline of `stages` chunks in flight ahead of the compute
            arrived, slots = Tokens(env, 0), Tokens(env, self.stages)
            env.process(self._loader(index, part, chunks, load, l2, arrived, slots))
        stores = []
        for chunk in range(chunks):
            if arrived is not None and (wait := arrived.take()) is not None:
                yield wait
            if (wait := unit.acquire()) is not None:
                yield wait
            started = env.now
            yield self._timeout(compute + (part.latency_ns if chunk == 0 else 0.0))
            unit.release()
            if slots is not None:
                slots.give()
            if self.record:
                self.slices.append(Slice(f"core{part.cores[0]}.{part.unit}", index, started,
                                         env.now))
            if store:
                stores.append(env.process(machine.dram_transfer(
                    store, part.cores, part.channel, through_port=not part.l2_bytes, op=index,
                    mix=mix)))
        if stores:
            yield simpy.AllOf(env, stores)
        self.events += 2 * chunks

    def _loader(self, index: int, part: Part, chunks: int, load: float, l2: float,
                arrived: Tokens, slots: Tokens) -> Process:
        """Issue each chunk's loads once a pipeline slot is free; a chunk becomes ready one
        access latency after its bytes have crossed, without holding up the next load."""
        env, machine = self.env, self.machine
        latency = machine.dram_latency_ns if load else 0.0
        mix = turnaround_factor(self.hw, part.dram_load_bytes, part.dram_store_bytes)
        for _ in range(chunks):
            if (wait := slots.take()) is not None:
                yield wait
            dram = machine.dram_transfer(load, part.cores, part.channel, through_port=not l2,
                                         wait_latency=False, op=index,
                                         port_ns_per_byte=part.port_ns_per_byte,
                                         mix=mix) if load else None
            cache = machine.l2_transfer(l2, part.cores, op=index,
                                        port_ns_per_byte=part.port_ns_per_byte) if l2 else None
            if dram and cache:
                yield simpy.AllOf(env, [env.process(dram), env.process(cache)])
            else:
                yield from dram or cache  # type: ignore[misc]
            if latency:
                env.timeout(latency).callbacks.append(arrived.give)
            else:
                arrived.give()
        self.events += 3 * chunks

    def _launch(self) -> Process:
        """One kernel launch: serial on the host's launcher."""
        if self.launch_ns:
            if (wait := self.launcher.acquire()) is not None:
                yield wait
            self.machine.usage.add("launch", self.launch_ns)
            yield self._timeout(self.launch_ns)
            self.launcher.release()

    def _task(self, index: int, task: Task, prerequisites: list[simpy.Event],
              lanes: list[list[simpy.Event]]) -> Process:
        env = self.env
        if prerequisites:
            yield simpy.AllOf(env, prerequisites)
        if not task.stages:  # a collective: the stream waits on the links
            yield from self._launch()
            self.start[index] = env.now
            yield self._timeout(task.link_ns)
            self.end[index] = env.now
            return
        last = len(task.stages) - 1
        for number, stage in enumerate(task.stages):
            yield from self._launch()
            if number == 0:
                self.start[index] = env.now
            go = env.event()
            runs = []
            for lane, part in enumerate(stage):
                waits = lanes[lane] if number == 0 and lanes and lanes[lane] else []
                ready = simpy.AllOf(env, [go, *waits]) if waits else go
                runs.append(env.process(self._part(index, part, ready)))
            go.succeed()
            if number == last:
                for run, event in zip(runs, self.part_done[index], strict=True):
                    run.callbacks.append(lambda _e, ev=event: ev.succeed())
            yield simpy.AllOf(env, runs)
            if self.barrier_ns and len(stage) > 1 and not task.lane_deps:
                yield self._timeout(self.barrier_ns)
        self.end[index] = env.now

    def run(self, host_bytes: float, step: bool = True) -> Timeline:
        """Simulate the tasks; `step`: they open a step (a graph launch is paid first)."""
        env = self.env
        host = env.process(self._step_start(host_bytes) if step and self.step_launch_ns
                           else self.machine.host_transfer(host_bytes))
        for task in self.tasks:
            self.part_done.append([env.event() for _ in (task.stages[-1] if task.stages
                                                         else ())])
            self.done.append(env.event())
        processes = []
        overlap = self.hw.scheduling.overlap_ops
        for index, task in enumerate(self.tasks):
            deps = list(task.op.deps)
            if not overlap and index > 0:
                deps.append(index - 1)
            lanes: list[list[simpy.Event]] = []
            if task.lane_deps:
                lanes = [[self.part_done[d][lane] for d in deps
                          if lane < len(self.part_done[d])] for lane in range(len(task.stages[0]))]
                prerequisites = [host] if not deps else []
            else:
                prerequisites = [self.done[d] for d in deps] or [host]
            process = env.process(self._task(index, task, prerequisites, lanes))
            process.callbacks.append(lambda _e, ev=self.done[index]: ev.succeed())
            processes.append(process)
        env.run()
        slices = [*self.slices, *(self.machine.slices or [])]
        return Timeline(makespan_ns=env.now, op_start_ns=self.start, op_end_ns=self.end,
                        usage=self.machine.usage, events=self.events, slices=slices)


def _one_stream(hw: Hardware, tasks: list[Task], host_bytes: float, record: bool) -> Timeline:
    """Ops one after another, each distinct op simulated alone once (see module notes)."""
    host = _Run(hw, [], record).run(host_bytes)
    now, usage, events, slices = host.makespan_ns, host.usage, host.events, list(host.slices)
    starts: list[float] = []
    ends: list[float] = []
    links_free = 0.0  # collectives that overlap the stream run one after another
    from simulator.engine.memo import table

    alone: dict[tuple, Timeline] = table(hw, "alone")  # kept across calls
    seen: set[tuple] = set()  # events count each distinct op of this call once
    for index, task in enumerate(tasks):
        key = (task.stages, task.link_ns, record)
        run = alone.get(key)
        if run is None:
            by_itself = replace(task, op=replace(task.op, deps=()))
            run = alone[key] = _Run(hw, [by_itself], record).run(0.0, step=False)
        if key not in seen:
            seen.add(key)
            events += run.events
        now = max([now, *(ends[d] for d in task.op.deps)])  # an overlapped collective's end
        begin = max(now, links_free) if not task.stages else now  # one collective at a time
        starts.append(begin + run.op_start_ns[0])
        ends.append(begin + run.op_end_ns[0])
        usage.merge(run.usage)
        slices.extend(replace(piece, op=index, start_ns=begin + piece.start_ns,
                              end_ns=begin + piece.end_ns) for piece in run.slices)
        if not task.stages:
            links_free = begin + run.makespan_ns
        if not task.overlaps:
            now = begin + run.makespan_ns
    return Timeline(makespan_ns=max([now, *ends]), op_start_ns=starts, op_end_ns=ends,
                    usage=usage, events=events, slices=slices)


def simulate_tasks(hw: Hardware, tasks: list[Task], host_bytes: float = 0.0,
                   record: bool = False) -> Timeline:
    """Simulate `tasks` (in trace order) on `hw`; `record` keeps per-chunk slices."""
    if hw.scheduling.overlap_ops or any(task.lane_deps for task in tasks):
        return _Run(hw, tasks, record).run(host_bytes)
    return _one_stream(hw, tasks, host_bytes, record)
