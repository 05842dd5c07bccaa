"""One collective on a system: `simulate op allreduce|allgather|reducescatter|alltoall|
sendrecv|broadcast --hw SYSTEM --bytes SIZE`, timed by the event simulation
(simulator.engine.network) and reported with nccl-tests' bandwidth definitions
(NVIDIA/nccl-tests doc/PERFORMANCE.md): algbw = size / time; busbw = algbw × 2(n−1)/n for
all-reduce, × (n−1)/n for all-gather, reduce-scatter and all-to-all, × 1 for broadcast and
send/recv. `size` is nccl-tests' size: the whole buffer of one rank (all-gather: the
gathered output, reduce-scatter: the input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import simpy

from simulator.engine.network import Network
from simulator.errors import UserError
from simulator.hardware.system import System

KINDS = ("allreduce", "allgather", "reducescatter", "alltoall", "sendrecv", "broadcast")
#: ring: NCCL's rings (every kind; an all-to-all is direct); tree: its two pipelined trees
#: (all-reduce); nvls: the switch reduces and multicasts (all-reduce within a node whose
#: level declares multicast); hierarchical: an all-to-all in a node-then-across-nodes pair.
ALGORITHMS = ("ring", "tree", "nvls", "hierarchical")


def bus_factor(kind: str, devices: int) -> float:
    """busbw / algbw for `kind` on `devices` ranks (nccl-tests PERFORMANCE.md)."""
    n = devices
    if kind == "allreduce":
        return 2 * (n - 1) / n
    if kind in ("allgather", "reducescatter", "alltoall"):
        return (n - 1) / n
    return 1.0


@dataclass(frozen=True)
class CollectiveResult:
    """What one collective took, with nccl-tests' bandwidths."""

    system: str
    kind: str
    algorithm: str
    devices: int
    bytes: float
    latency_s: float

    @property
    def algbw_bytes_per_s(self) -> float:
        return self.bytes / self.latency_s if self.latency_s else 0.0

    @property
    def busbw_bytes_per_s(self) -> float:
        return self.algbw_bytes_per_s * bus_factor(self.kind, self.devices)

    def to_dict(self) -> dict[str, object]:
        return {"system": self.system, "collective": self.kind, "algorithm": self.algorithm,
                "devices": self.devices, "bytes": self.bytes, "latency_s": self.latency_s,
                "algbw_bytes_per_s": self.algbw_bytes_per_s,
                "busbw_bytes_per_s": self.busbw_bytes_per_s}


def run_collective(system: System, kind: str, nbytes: float, devices: int | None = None,
                   algorithm: str = "ring", stride: int = 1) -> CollectiveResult:
    """Time one `kind` collective of `nbytes` over the first `devices` devices of `system`
    (default: all; every `stride`-th from device 0, a data-parallel group across tensor-
    parallel ones) on otherwise idle links."""
    if kind not in KINDS:
        raise UserError("simulate op", f"expected one of {', '.join(KINDS)}, not {kind!r}")
    if algorithm not in ALGORITHMS:
        raise UserError("--algorithm", f"expected one of {', '.join(ALGORITHMS)}, not "
                                       f"{algorithm!r}")
    count = system.count if devices is None else devices
    if (isinstance(count, bool) or not isinstance(count, int)
            or not 1 <= (count - 1) * stride + 1 <= system.count):
        raise UserError("--devices", f"expected 1 … {system.count} ({system.name} has "
                                     f"{system.count} devices), not {devices!r}")
    runs = {"tree": "allreduce", "nvls": "allreduce", "hierarchical": "alltoall"}
    if algorithm in runs and kind != runs[algorithm]:
        raise UserError("--algorithm", f"{algorithm} runs {runs[algorithm]}s; expected ring "
                                       f"for {kind}")
    if algorithm == "nvls" and not (system.links[0].multicast and system.links[0].span == "node"
                                    and count <= system.devices.per_node):
        raise UserError("--algorithm", f"nvls reduces in a node's switch; {system.name} "
                        "declares none (links.0.multicast) for these devices; expected ring "
                        "or tree")
    if not nbytes > 0:
        raise UserError("--bytes", f"expected a size above zero, e.g. 1GiB, not {nbytes!r}")
    env = simpy.Environment()
    network = Network(env, system, system.count)
    ranks = list(range(0, count * stride, stride))
    env.process(network.collective(kind, nbytes, ranks, algorithm))
    env.run()
    return CollectiveResult(system.name, kind, algorithm, count, nbytes, env.now * 1e-9)


def run_alltoallv(system: System, matrix: Sequence[Sequence[float]]) -> float:
    """Seconds an all-to-all of uneven messages takes on the first len(matrix) devices of
    `system` on idle links: device s sends matrix[s][d] bytes to device d."""
    env = simpy.Environment()
    network = Network(env, system, system.count)
    env.process(network.alltoallv(matrix, list(range(len(matrix)))))
    env.run()
    return env.now * 1e-9
