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

import itertools
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

    def collective(self, kind: str, nbytes: float, ranks: list[int],
                   algorithm_name: str = "ring") -> Process:
        """One collective of `nbytes` (nccl-tests' size) over `ranks`; the process ends when
        every device holds its result. Ranks on several nodes run one ring per device of a
        node (NCCL's one ring per NIC), each leaving every node from a different device,
        with an equal share of the message. An all-reduce may instead run as NCCL's two
        trees (`tree`) or reduced in the switch (`nvls`)."""
        n = len(ranks)
        algorithm = plan(kind, n)
        if n == 1:
            return
        if algorithm_name == "tree":
            pairs = self._tree_channels(ranks)
            yield simpy.AllOf(self.env, [
                self.env.process(self._tree(nbytes / (2 * pairs), ranks, flip, c, pairs))
                for c in range(pairs) for flip in (False, True)])
            return
        if algorithm_name == "nvls":
            yield from self._switch_reduce(nbytes, ranks)
            return
        if algorithm_name == "hierarchical":
            yield from self._hierarchical(nbytes * algorithm.share, ranks)
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

    def _tree_channels(self, ranks: list[int]) -> int:
        """Tree pairs an all-reduce runs: one per device of a node across nodes (NCCL's
        channels, one per NIC, as its rings), one within a node."""
        per_node = self.system.devices.per_node
        nodes: dict[int, int] = {}
        for rank in ranks:
            nodes[rank // per_node] = nodes.get(rank // per_node, 0) + 1
        return min(nodes.values()) if len(nodes) > 1 else 1

    def tree(self, ranks: list[int], flip: bool, channel: int = 0) -> dict[int, int]:
        """Parent of each rank but the root in one of NCCL's two all-reduce trees of a
        channel: a node's devices chained under its device number `channel` (the chain
        reversed, `flip`), the nodes' heads in a binary tree by node (in reverse order,
        `flip`), so each device sits low in one tree and high in the other."""
        per_node = self.system.devices.per_node
        nodes: dict[int, list[int]] = {}
        for rank in ranks:
            nodes.setdefault(rank // per_node, []).append(rank)
        groups = []
        for group in nodes.values():
            turned = group[channel % len(group):] + group[:channel % len(group)]
            groups.append([turned[0], *turned[1:][::-1]] if flip else turned)
        if flip:
            groups.reverse()
        parent: dict[int, int] = {}
        for group in groups:
            parent |= {child: up for up, child in itertools.pairwise(group)}
        heads = [group[0] for group in groups]
        parent |= {head: heads[(i - 1) // 2] for i, head in enumerate(heads) if i}
        return parent

    def _tree(self, nbytes: float, ranks: list[int], flip: bool, channel: int,
              channels: int) -> Process:
        """One tree's share of a tree all-reduce: chunks reduced up the tree to its root
        and broadcast back down, pipelined (a rank sends chunk c up once its children's
        chunk c is in)."""
        parent = self.tree(ranks, flip, channel)
        children: dict[int, list[int]] = {rank: [] for rank in ranks}
        for child, up in parent.items():
            children[up].append(child)
        budget = MAX_TRANSFERS // (4 * channels * len(ranks))
        chunks = max(1, min(MAX_CHUNKS, budget, math.ceil(nbytes / CHUNK_BYTES)))
        chunk = nbytes / chunks
        up = [{rank: self.env.event() for rank in ranks} for _ in range(chunks)]
        down = [{rank: self.env.event() for rank in ranks} for _ in range(chunks)]
        for c in range(chunks):
            for rank in ranks:
                self.env.process(self._tree_step(rank, parent.get(rank), children[rank],
                                                 chunk, up[c], down[c]))
        yield simpy.AllOf(self.env, [down[c][rank] for c in range(chunks) for rank in ranks])

    def _tree_step(self, rank: int, up_to: int | None, children: list[int], chunk: float,
                   up: dict[int, simpy.Event], down: dict[int, simpy.Event]) -> Process:
        """One rank's part in one chunk: reduce its children's partial sums into its own and
        send them up; then, once the sum comes down (the root: once it is complete), hand
        it to its children."""
        if children:
            yield simpy.AllOf(self.env, [up[child] for child in children])
        if up_to is None:
            down[rank].succeed()
        else:
            yield from self.transfer(rank, up_to, chunk, up[rank])
            yield down[rank]
        for child in children:
            yield from self.transfer(rank, child, chunk, down[child])

    def _switch_reduce(self, nbytes: float, ranks: list[int]) -> Process:
        """All-reduce in the switch (NVLink SHARP): every device sends its whole message to
        the switch, which sums it and multicasts the sum back, chunk by chunk; a device's
        out port carries S once and its in port S once."""
        index = self.inner
        chunks = max(1, min(MAX_CHUNKS, math.ceil(nbytes / CHUNK_BYTES)))
        chunk = nbytes / chunks
        summed = [self.env.event() for _ in range(chunks)]
        landed = []
        for c in range(chunks):
            sent = [self.env.event() for _ in ranks]
            for rank, event in zip(ranks, sent, strict=True):
                self.env.process(self._port(self.out[rank][index], chunk, index, event))
            simpy.AllOf(self.env, sent).callbacks.append(
                lambda _e, done=summed[c]: done.succeed())
            for rank in ranks:
                event = self.env.event()
                landed.append(event)
                self.env.process(self._from_switch(self.into[rank][index], chunk, index,
                                                   summed[c], event))
        yield simpy.AllOf(self.env, landed)

    def _port(self, port: simpy.Resource, nbytes: float, index: int,
              arrived: simpy.Event) -> Process:
        """`nbytes` through one port of level `index` (to or from its switch)."""
        with port.request() as turn:
            yield turn
            yield self.env.timeout(nbytes * self.ns_per_byte[index])
        self.env.timeout(self.latency_ns[index]).callbacks.append(lambda _e: arrived.succeed())

    def _from_switch(self, port: simpy.Resource, nbytes: float, index: int,
                     ready: simpy.Event, arrived: simpy.Event) -> Process:
        yield ready
        yield from self._port(port, nbytes, index, arrived)

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

    def _hierarchical(self, share: float, ranks: list[int]) -> Process:
        """All-to-all in two steps (Tutel's and DeepSpeed-MoE's hierarchical one): inside
        each node a device gathers from its node's devices everything bound for devices of
        its own local number anywhere (`nodes` × `share` from each), then it exchanges
        with those devices across nodes (`per node` × `share` to each). Fewer, larger
        messages cross the nodes; every byte crosses the node's level twice."""
        per_node = self.system.devices.per_node
        nodes: dict[int, list[int]] = {}
        for rank in ranks:
            nodes.setdefault(rank // per_node, []).append(rank)
        groups = list(nodes.values())
        width = len(groups[0])
        if len(groups) == 1 or any(len(group) != width for group in groups):
            yield from self._direct(share, ranks)  # one node (or uneven ones): direct
            return
        inside = len(groups) * share
        yield simpy.AllOf(self.env, [self.env.process(self.alltoallv(
            [[0.0 if s == d else inside for d in range(width)] for s in range(width)], group))
            for group in groups])
        across = width * share
        yield simpy.AllOf(self.env, [self.env.process(self.alltoallv(
            [[0.0 if s == d else across for d in range(len(groups))]
             for s in range(len(groups))], [group[local] for group in groups]))
            for local in range(width)])

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
