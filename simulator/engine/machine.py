"""The machine as SimPy resources: core units, DRAM channels, the L2 and the host link.

Time inside the engine is in nanoseconds (floats), everywhere.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import simpy

from simulator.hardware.schema import Hardware

Process = Generator[simpy.Event, Any, None]


class Fifo:
    """A capacity-1 resource granted in request order, like simpy.Resource(capacity=1),
    without its per-request objects: `acquire` returns None when the resource is free
    (hold it at once) or an event to wait for; `release` hands it to the next waiter."""

    __slots__ = ("busy", "env", "waiting")

    def __init__(self, env: simpy.Environment) -> None:
        self.env, self.busy, self.waiting = env, False, deque()

    def acquire(self) -> simpy.Event | None:
        if not self.busy:
            self.busy = True
            return None
        event = self.env.event()
        self.waiting.append(event)
        return event

    def release(self) -> None:
        if self.waiting:
            self.waiting.popleft().succeed()
        else:
            self.busy = False


class Tokens:
    """A counter one process takes from (waiting while it is empty) and others give to:
    the pipeline's free slots (taken by the loader) and its arrived chunks (by the part)."""

    __slots__ = ("count", "env", "waiter")

    def __init__(self, env: simpy.Environment, count: int) -> None:
        self.env, self.count = env, count
        self.waiter: simpy.Event | None = None

    def take(self) -> simpy.Event | None:
        if self.count:
            self.count -= 1
            return None
        assert self.waiter is None, "Tokens serve one taker"
        self.waiter = self.env.event()
        return self.waiter

    def give(self, _event: object = None) -> None:
        if self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            waiter.succeed()
        else:
            self.count += 1


@dataclass(frozen=True)
class Slice:
    """One interval on one track (a core unit, a core's port, a DRAM channel, ...), in ns."""

    track: str
    op: int
    start_ns: float
    end_ns: float
    nbytes: float = 0.0
    ops: float = 0.0


@dataclass
class Usage:
    """What the machine did: busy time per resource and bytes it moved (ns, bytes).

    `track_bytes` counts the useful bytes each DRAM channel and the L2 moved: a narrow
    access holds a channel for a whole burst (`busy_ns`) but moves only its own bytes.
    """

    busy_ns: dict[str, float] = field(default_factory=dict)
    track_bytes: dict[str, float] = field(default_factory=dict)
    dram_bytes: float = 0.0
    dram_activated_bytes: float = 0.0
    l2_bytes: float = 0.0
    host_bytes: float = 0.0

    def add(self, track: str, ns: float) -> None:
        self.busy_ns[track] = self.busy_ns.get(track, 0.0) + ns

    def add_bytes(self, track: str, nbytes: float) -> None:
        self.track_bytes[track] = self.track_bytes.get(track, 0.0) + nbytes

    def merge(self, other: Usage) -> None:
        """Add what `other` did to this usage."""
        for track, ns in other.busy_ns.items():
            self.add(track, ns)
        for track, nbytes in other.track_bytes.items():
            self.add_bytes(track, nbytes)
        self.dram_bytes += other.dram_bytes
        self.dram_activated_bytes += other.dram_activated_bytes
        self.l2_bytes += other.l2_bytes
        self.host_bytes += other.host_bytes


def host_transfer_ns(hw: Hardware, nbytes: float) -> float:
    """Time to move `nbytes` from the host into device DRAM, in ns.

    Link latency + one fixed cost per write transaction (8-byte MMIO writes on the FPGA)
    + bytes over the link bandwidth, all slowed by the DRAM arbitration logic, which
    grows by `arbitration_growth` for each further core attached to a channel.
    """
    link = hw.host_link
    if link is None or nbytes <= 0:
        return 0.0
    clock = hw.core_clock
    writes = math.ceil(nbytes / link.transaction) if link.transaction else 1
    base = (link.latency.ns(clock) + writes * link.transaction_time.ns(clock)
            + nbytes / link.bandwidth * 1e9)
    return base * hw.memory.dram.arbitration_growth ** (hw.cores_per_channel - 1)


def channel_bandwidth(hw: Hardware) -> float:
    """Bytes/s one modelled DRAM channel sustains (all of them as one where interleaved)."""
    dram = hw.memory.dram
    return dram.bandwidth_per_channel * dram.efficiency * (dram.channels if dram.interleave
                                                           else 1)


def turnaround_factor(hw: Hardware, read: float, write: float) -> float:
    """How much longer DRAM takes for a part's bytes when it mixes reads and writes."""
    total = read + write
    if total <= 0 or not hw.memory.dram.turnaround:
        return 1.0
    return 1.0 + hw.memory.dram.turnaround * 2 * min(read, write) / total


class Machine:
    """SimPy resources of one `Hardware`, and the processes that move bytes through them."""

    def __init__(self, env: simpy.Environment, hw: Hardware, record: bool = False) -> None:
        self.env, self.hw = env, hw
        #: every resource hold, when a timeline is wanted
        self.slices: list[Slice] | None = [] if record else None
        dram = hw.memory.dram
        clock = hw.core_clock
        self.channels = 1 if dram.interleave else dram.channels
        channel_bw = channel_bandwidth(hw)
        self.dram = [Fifo(env) for _ in range(self.channels)]
        self.units = {(core, name): Fifo(env)
                      for core in range(hw.cores.count) for name in hw.cores.units}
        #: each core's load-store port: one access per `access_interval`, shared by its ops
        self.ports = [Fifo(env) for _ in range(hw.cores.count)]
        self.l2 = Fifo(env) if hw.memory.l2 else None
        self.host = Fifo(env)
        access_bytes = dram.access_width / 8
        #: ns a channel is occupied per access of one core
        self.occupancy_ns = max(access_bytes, dram.burst) / channel_bw * 1e9
        self.channel_ns_per_byte = 1e9 / channel_bw
        self.access_bytes = access_bytes
        self.interval_ns = dram.access_interval.ns(clock)
        self.dram_latency_ns = dram.latency.ns(clock)
        self.l2_ns_per_byte = 1e9 / hw.memory.l2.bandwidth if hw.memory.l2 else 0.0
        self.usage = Usage()

    def _note(self, track: str, op: int, start: float, nbytes: float) -> None:
        if self.slices is not None and self.env.now > start:
            self.slices.append(Slice(track, op, start, self.env.now, nbytes))

    def _through(self, shared: Fifo, track: str, held_ns: float, core: int | None,
                 port_ns: float, op: int, nbytes: float) -> Process:
        """Hold `shared` for `held_ns` while the core's port (if any) is busy `port_ns`."""
        env = self.env
        port = None if core is None else self.ports[core]
        if port is not None and (wait := port.acquire()) is not None:
            yield wait
        start = env.now
        if (wait := shared.acquire()) is not None:
            yield wait
        held = env.now

        def let_go(_event: object) -> None:
            shared.release()
            self._note(track, op, held, nbytes)

        if port is None:
            yield env.timeout(held_ns)
            let_go(None)
            return
        # the shared resource is let go by a callback, so one wake-up serves both
        env.timeout(held_ns).callbacks.append(let_go)
        yield env.timeout(max(held_ns, start + port_ns - held))
        port.release()
        self._note(f"core{core}.dma", op, start, nbytes)

    def dram_transfer(self, nbytes: float, cores: tuple[int, ...], channel: int,
                      through_port: bool = True, wait_latency: bool = True,
                      op: int = -1, port_ns_per_byte: float = 0.0,
                      mix: float = 1.0) -> Process:
        """Identical `cores` each move `nbytes` over `channel`.

        A core's port is held for its accesses (access width × access interval), so ops
        on one core share it; the channel is held for the accesses of the whole group,
        each occupying at least a burst, so cores on one channel contend. Where an L2
        feeds the cores (`through_port` false) only the channel is held here. Without
        `wait_latency` the caller accounts for the access latency itself. A part that keeps
        few bytes in flight holds its port `port_ns_per_byte` per byte instead (its fetch
        rate by Little's law). `mix` stretches the channel time of a part that both reads
        and writes (`turnaround_factor`).
        """
        accesses = nbytes / self.access_bytes
        occupied = len(cores) * accesses * self.occupancy_ns * mix
        port_ns = nbytes * port_ns_per_byte if port_ns_per_byte else accesses * self.interval_ns
        yield from self._through(self.dram[channel], f"dram{channel}", occupied,
                                 cores[0] if through_port else None, port_ns, op,
                                 len(cores) * nbytes)
        self.usage.add(f"dram{channel}", occupied)
        self.usage.add_bytes(f"dram{channel}", len(cores) * nbytes)
        self.usage.dram_bytes += len(cores) * nbytes
        self.usage.dram_activated_bytes += len(cores) * accesses * max(
            self.access_bytes, self.hw.memory.dram.burst)
        if wait_latency:
            yield self.env.timeout(self.dram_latency_ns)

    def l2_transfer(self, nbytes: float, cores: tuple[int, ...], op: int = -1,
                    port_ns_per_byte: float = 0.0) -> Process:
        """Identical `cores` each move `nbytes` between the shared L2 and their port (held
        `port_ns_per_byte` per byte where given, as in `dram_transfer`)."""
        assert self.l2 is not None
        held = len(cores) * nbytes * self.l2_ns_per_byte
        port = (nbytes * port_ns_per_byte if port_ns_per_byte
                else nbytes / self.access_bytes * self.interval_ns)
        yield from self._through(self.l2, "l2", held, cores[0], port, op, len(cores) * nbytes)
        self.usage.add("l2", held)
        self.usage.add_bytes("l2", len(cores) * nbytes)
        self.usage.l2_bytes += len(cores) * nbytes

    def host_transfer(self, nbytes: float) -> Process:
        """Host → device copy over the host link, written into DRAM channel 0."""
        held = host_transfer_ns(self.hw, nbytes)
        if held <= 0:
            return
        yield from self._through(self.host, "host", held, None, 0.0, -1, nbytes)
        self.usage.add("host", held)
        self.usage.host_bytes += nbytes
        written = nbytes * self.channel_ns_per_byte  # the host writes full bursts
        yield from self._through(self.dram[0], "dram0", written, None, 0.0, -1, nbytes)
        self.usage.add("dram0", written)
        self.usage.add_bytes("dram0", nbytes)
        self.usage.dram_bytes += nbytes
        self.usage.dram_activated_bytes += nbytes
