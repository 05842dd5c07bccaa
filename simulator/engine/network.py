"""Links and collectives as SimPy processes.

Every device has one port per direction into each level of its system's topology (a
non-blocking switch). A transfer holds the sender's out port and the receiver's in port
for bytes / (bandwidth × efficiency), then arrives one level latency later; the ports are
free for the next transfer meanwhile. Collectives are made of such transfers, chunked and
pipelined as NCCL's Simple protocol runs them: a ring step's chunk leaves a device once the
same chunk of the step before has arrived there, so chunks of one collective overlap along
the ring, and collectives that share ports (or a collective and other traffic) slow each
other down by contention, not by a formula.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass

import simpy

from simulator.hardware.system import System

Process = Generator[simpy.Event, object, None]

#: Bytes NCCL moves per pipelined ring transfer: its Simple protocol's slice of the 4 MiB
#: channel buffer over NCCL_STEPS = 8 (nccl src/include/device.h, NCCL_BUFFSIZE default).
CHUNK_BYTES = 512 * 1024
#: Most chunks a ring step is cut into (a larger message moves bigger chunks: the same
#: pipeline, fewer events).
MAX_CHUNKS = 64
#: Most transfers one collective is simulated with: a long ring's steps move fewer, larger
#: chunks (its pipeline fill is then a few chunks longer).
MAX_TRANSFERS = 100_000


@dataclass(frozen=True)
class Algorithm:
    """How a collective moves data: the ring steps each device sends, as fractions of the
    message, and whether it is a ring at all (all-to-all and send/recv are direct)."""

    steps: int
    share: float
    ring: bool = True


def plan(kind: str, devices: int) -> Algorithm:
    """Ring all-reduce: 2(n−1) steps of S/n; reduce-scatter and all-gather: n−1 of S/n;
    broadcast: n−1 hops of the whole message (pipelined); send/recv: one shift of S;
    all-to-all: S/n from every device to every other, at once."""
    n = devices
    if kind == "allreduce":
        return Algorithm(2 * (n - 1), 1 / n)
    if kind in ("reducescatter", "allgather"):
        return Algorithm(n - 1, 1 / n)
    if kind == "broadcast":
        return Algorithm(n - 1, 1.0)
    if kind == "sendrecv":
        return Algorithm(1, 1.0)
    if kind == "alltoall":
        return Algorithm(1, 1 / n, ring=False)
    raise ValueError(kind)


class Network:
    """The ports of every device of `system` on one SimPy environment."""

    def __init__(self, env: simpy.Environment, system: System, devices: int) -> None:
        self.env, self.system = env, system
        levels = range(len(system.links))
        self.out = [[simpy.Resource(env) for _ in levels] for _ in range(devices)]
        self.into = [[simpy.Resource(env) for _ in levels] for _ in range(devices)]
        # per level: ns per byte at the sustained rate, and the latency in ns
        self.ns_per_byte = [1e9 / (level.bandwidth * level.efficiency) for level in system.links]
        self.latency_ns = [level.latency.seconds * 1e9 for level in system.links]
        self.per_node = system.devices.per_node
        self.inner = 0  # the innermost level: a node's, or the system's where there is none
        self.outer = len(system.links) - 1  # the level between nodes

    def transfer(self, src: int, dst: int, nbytes: float, arrived: simpy.Event) -> Process:
        """Send `nbytes` from `src` to `dst`; `arrived` succeeds when the last byte lands.
        Returns once the ports are free again (before the arrival)."""
        index = self.inner if src // self.per_node == dst // self.per_node else self.outer
        with self.out[src][index].request() as out, self.into[dst][index].request() as into:
            yield out
            yield into
            yield self.env.timeout(nbytes * self.ns_per_byte[index])
        self.env.timeout(self.latency_ns[index]).callbacks.append(lambda _e: arrived.succeed())

    def collective(self, kind: str, nbytes: float, ranks: list[int]) -> Process:
        """One collective of `nbytes` (nccl-tests' size) over `ranks`; the process ends when
        every device holds its result. Ranks on several nodes run one ring per device of a
        node (NCCL's one ring per NIC), each leaving every node from a different device,
        with an equal share of the message."""
        n = len(ranks)
        algorithm = plan(kind, n)
        if n == 1:
            return
        if not algorithm.ring:
            yield from self._direct(nbytes * algorithm.share, ranks)
            return
        rings = [ranks] if kind == "broadcast" else self.rings(ranks)  # one root: one chain
        yield simpy.AllOf(self.env, [self.env.process(self._ring(kind, nbytes / len(rings),
                                                                 ring, algorithm, len(rings)))
                                     for ring in rings])

    def rings(self, ranks: list[int]) -> list[list[int]]:
        """The ring orders a collective over `ranks` runs: one, within a node; across nodes
        one per device of a node, each rotating the devices of every node by one more.

        Over more than two nodes of equal groups the rings are simulated over the first two
        only: on idle, identical nodes every stretch of a ring between two node crossings
        does the same at the same time, so a ring of two stretches run with the full ring's
        steps and step bytes (`_ring` takes those from the algorithm) times the whole one
        (as identical cores of a chip are simulated once)."""
        per_node = self.system.devices.per_node
        nodes: dict[int, list[int]] = {}
        for rank in ranks:
            nodes.setdefault(rank // per_node, []).append(rank)
        if len(nodes) == 1:
            return [ranks]
        groups = list(nodes.values())
        if len(groups) > 2 and len({len(group) for group in groups}) == 1:
            groups = groups[:2]
        width = min(len(group) for group in groups)
        return [[rank for group in groups for rank in group[c:] + group[:c]]
                for c in range(width)]

    def _ring(self, kind: str, nbytes: float, ranks: list[int], algorithm: Algorithm,
              rings: int) -> Process:
        """One of `rings` rings' share of a ring collective, chunked and pipelined (with no
        more chunks than keep the whole collective within MAX_TRANSFERS transfers)."""
        n = len(ranks)
        step_bytes = nbytes * algorithm.share
        budget = MAX_TRANSFERS // (rings * n * algorithm.steps)
        chunks = max(1, min(MAX_CHUNKS, budget, math.ceil(step_bytes / CHUNK_BYTES)))
        chunk = step_bytes / chunks
        steps = algorithm.steps
        # arrived[s][r][c]: chunk c of step s has reached ring position r
        arrived = [[[self.env.event() for _ in range(chunks)] for _ in range(n)]
                   for _ in range(steps)]
        # a broadcast is a chain from the root: device p forwards at step p only
        chain = kind == "broadcast"
        senders = range(n - 1) if chain else range(n)
        for c in range(chunks):
            for position in senders:
                self.env.process(self._walk(ranks, position, c, chunk,
                                            [position] if chain else range(steps), arrived))
        last = [arrived[steps - 1][(p + 1) % n][c] for p in ([n - 2] if chain else senders)
                for c in range(chunks)]
        yield simpy.AllOf(self.env, last)

    def _walk(self, ranks: list[int], position: int, c: int, chunk: float,
              steps: Iterable[int], arrived: list[list[list[simpy.Event]]]) -> Process:
        """One chunk's sends from ring `position` at `steps`: each once the same chunk of
        the step before has arrived here."""
        to = (position + 1) % len(ranks)
        for step in steps:
            if step > 0:
                yield arrived[step - 1][position][c]
            yield from self.transfer(ranks[position], ranks[to], chunk, arrived[step][to][c])

    def _direct(self, share: float, ranks: list[int]) -> Process:
        """All-to-all: every device sends `share` bytes to every other."""
        n = len(ranks)
        yield from self.alltoallv([[0.0 if s == d else share for d in range(n)]
                                   for s in range(n)], ranks)

    def alltoallv(self, matrix: Sequence[Sequence[float]], ranks: list[int]) -> Process:
        """All-to-all of uneven messages: ranks[s] sends matrix[s][d] bytes to ranks[d]
        (nothing where 0), all at once in a staggered order (device s first to s+1, then
        s+2, …) so that no receiver is everyone's first."""
        n = len(ranks)
        landed = []
        for offset in range(1, n):
            for position in range(n):
                nbytes = matrix[position][(position + offset) % n]
                if nbytes <= 0:
                    continue
                event = self.env.event()
                landed.append(event)
                self.env.process(self.transfer(ranks[position], ranks[(position + offset) % n],
                                               nbytes, event))
        yield simpy.AllOf(self.env, landed)
