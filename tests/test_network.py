"""Systems of devices and links, and collectives as events (issue "Many devices")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import simpy

from simulator.calibration.fit import shipped_cases
from simulator.calibration.links import CASES, fit_efficiency
from simulator.cli import main
from simulator.collective import KINDS, bus_factor, run_collective
from simulator.engine.network import CHUNK_BYTES, Network
from simulator.errors import UserError
from simulator.hardware.loader import shipped, shipped_systems
from simulator.hardware.system import load_system
from simulator.validation.cases import measure


def test_shipped_systems_load_and_chips_stay_chips() -> None:
    assert {"dgx_a100.yaml", "dgx_h100.yaml", "hgx_a100_4gpu.yaml"} <= set(shipped_systems())
    assert not set(shipped()) & set(shipped_systems())
    system, chip = load_system("dgx_a100")
    assert system.count == 8 and chip.name == "nvidia-a100-sxm4-80gb"


def test_a_ring_allreduce_on_idle_links_is_its_closed_form() -> None:
    """One chunk per step: 2(n−1) steps, each α + (S/n)·β (β = 1 / bandwidth·efficiency)."""
    system, _ = load_system("dgx_a100.yaml")
    level = system.links[0]
    beta = 1 / (level.bandwidth * level.efficiency)
    alpha = level.latency.seconds
    for n in (2, 4, 8):
        size = n * CHUNK_BYTES  # S/n is one chunk
        got = run_collective(system, "allreduce", size, n).latency_s
        assert got == pytest.approx(2 * (n - 1) * (alpha + size / n * beta), rel=1e-9)
        gather = run_collective(system, "allgather", size, n).latency_s
        assert gather == pytest.approx((n - 1) * (alpha + size / n * beta), rel=1e-9)


def test_chunks_pipeline_along_the_ring() -> None:
    """Many chunks: the steps overlap, so a big message costs its bytes plus one pipeline
    fill, far less than every chunk paying every latency."""
    system, _ = load_system("dgx_a100.yaml")
    level = system.links[0]
    beta, alpha, n = 1 / (level.bandwidth * level.efficiency), level.latency.seconds, 8
    size = 64 * n * CHUNK_BYTES
    got = run_collective(system, "allreduce", size, n).latency_s
    bandwidth_bound = 2 * (n - 1) * size / n * beta
    assert bandwidth_bound < got < bandwidth_bound + 2 * (n - 1) * alpha + 64 * alpha


def test_two_collectives_sharing_links_take_longer_than_one() -> None:
    system, _ = load_system("dgx_a100.yaml")
    alone = run_collective(system, "allreduce", 64 << 20).latency_s
    env = simpy.Environment()
    network = Network(env, system, system.count)
    for _ in range(2):
        env.process(network.collective("allreduce", 64 << 20, list(range(8))))
    env.run()
    assert env.now * 1e-9 > 1.8 * alone
    # on disjoint devices they do not meet
    env = simpy.Environment()
    network = Network(env, system, system.count)
    for ranks in ([0, 1, 2, 3], [4, 5, 6, 7]):
        env.process(network.collective("allreduce", 64 << 20, ranks))
    env.run()
    assert env.now * 1e-9 == pytest.approx(run_collective(system, "allreduce", 64 << 20,
                                                          4).latency_s, rel=1e-12)


def test_busbw_follows_nccl_tests_definitions() -> None:
    system, _ = load_system("dgx_a100.yaml")
    for kind in KINDS:
        result = run_collective(system, kind, 256 << 20)
        assert result.algbw_bytes_per_s == pytest.approx(result.bytes / result.latency_s)
        assert result.busbw_bytes_per_s == pytest.approx(
            result.algbw_bytes_per_s * bus_factor(kind, 8))
    assert bus_factor("allreduce", 8) == pytest.approx(14 / 8)
    assert bus_factor("allgather", 8) == bus_factor("alltoall", 8) == pytest.approx(7 / 8)
    assert bus_factor("sendrecv", 8) == bus_factor("broadcast", 8) == 1.0


def test_link_fits_reproduce_the_shipped_efficiencies_and_the_held_out_pair() -> None:
    cases = shipped_cases(CASES).values()
    assert {case.role for case in cases} == {"fitted", "held-out", "open"}
    for case in cases:
        system, _ = load_system(case.hardware)
        if case.role == "fitted":
            assert fit_efficiency(case) == pytest.approx(system.links[0].efficiency, abs=1e-4)
        elif case.role == "held-out":
            assert abs(measure(case) / case.reference - 1) <= case.tolerance
        else:  # the NVLS miss stays visible: over-predicted, never fitted
            assert measure(case) > case.reference * 1.15


def test_a_link_level_is_set_by_its_index() -> None:
    half, _ = load_system("dgx_a100.yaml", {"links.0.efficiency": 0.5})
    shipped, _ = load_system("dgx_a100.yaml")
    slow = run_collective(half, "allreduce", 1 << 30).busbw_bytes_per_s
    assert slow == pytest.approx(run_collective(shipped, "allreduce", 1 << 30)
                                 .busbw_bytes_per_s * 0.5 / shipped.links[0].efficiency,
                                 rel=1e-3)


def test_simulate_op_allreduce_prints_the_json_contract(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert main(["op", "allreduce", "--hw", "dgx_a100.yaml", "--bytes", "1GiB",
                 "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"latency_s", "algbw_bytes_per_s", "busbw_bytes_per_s"} <= set(out)
    assert out["bytes"] == 1 << 30 and out["devices"] == 8
    assert main(["op", "allreduce", "--hw", "dgx_a100.yaml", "--bytes", "1GiB",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == out  # the same inputs, the same JSON


@pytest.mark.parametrize(("args", "flag"), [
    (["--hw", "gpu_a100.yaml", "--bytes", "1GiB"], "gpu_a100.yaml"),
    (["--hw", "dgx_a100.yaml", "--bytes", "1GiB", "--devices", "9"], "--devices"),
    (["--hw", "dgx_a100.yaml", "--bytes", "1GiB", "--algorithm", "nvls"], "--algorithm"),
    (["--hw", "dgx_a100.yaml", "--bytes", "1GiB", "--algorithm", "double"], "--algorithm"),
    (["--hw", "dgx_a100.yaml", "--bytes", "1 parsec"], "--bytes"),
    (["--hw", "dgx_a100.yaml", "--bytes", "0B"], "--bytes"),
    (["--hw", "dgx_a100.yaml", "--bytes", "1GiB", "--hw-set", "nodes=2"], "links"),
])
def test_bad_collective_inputs_are_one_line(args: list[str], flag: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["op", "allreduce", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_a_system_is_refused_where_one_chip_is_expected(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert main(["op", "gemm", "--m", "64", "--n", "64", "--k", "64", "--hw",
                 "dgx_a100.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "system" in err


def test_the_collectives_study_writes_its_curve_and_the_measured_points(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simulator.studies import collectives

    monkeypatch.setattr(collectives, "SIZES", (1 << 10, 1 << 20, 1 << 30))
    monkeypatch.setattr("sys.argv", ["collectives", "--out", str(tmp_path)])
    collectives.main()
    rows = (tmp_path / "collectives.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * len(collectives.CURVES)
    assert (tmp_path / "collectives_busbw.png").stat().st_size > 10_000
    busbw = [float(row.split(",")[-1]) for row in rows[1:4]]
    assert busbw[0] < busbw[1] < busbw[2]  # latency-bound small, link-bound large
    points = collectives.measured()
    assert {p["role"] for p in points} == {"fitted", "held-out"} and len(points) == 3


def test_a_long_ring_over_identical_nodes_is_timed_by_two_of_them() -> None:
    """Rings over 4 nodes are simulated over 2 (translation symmetry on idle links): the
    same time as all 4 simulated, and one NIC per GPU carries a ring across nodes."""
    system, _ = load_system("dgx_a100_cluster.yaml", {"nodes": 4})

    class Whole(Network):
        def rings(self, ranks: list[int]) -> list[list[int]]:
            groups = [ranks[i:i + 8] for i in range(0, len(ranks), 8)]
            return [[r for g in groups for r in g[c:] + g[:c]] for c in range(8)]

    def timed(network_type: type[Network], size: int) -> float:
        env = simpy.Environment()
        network = network_type(env, system, system.count)
        env.process(network.collective("allreduce", size, list(range(32))))
        env.run()
        return env.now

    for size in (1 << 16, 64 << 20):
        assert timed(Network, size) == pytest.approx(timed(Whole, size), rel=1e-9)
    two, _ = load_system("dgx_a100_cluster.yaml")
    cross = run_collective(two, "allreduce", 1 << 30).busbw_bytes_per_s
    ib = two.links[1]
    # 8 rings, each leaving a node through its own 25 GB/s port
    assert cross == pytest.approx(ib.bandwidth * ib.efficiency * 8, rel=0.02)


def test_nccl_trees_span_every_rank_once_and_beat_rings_on_small_messages_across_nodes(
) -> None:
    system, _ = load_system("dgx_a100_cluster.yaml", {"nodes": 8})
    network = Network(simpy.Environment(), system, system.count)
    ranks = list(range(system.count))
    for flip in (False, True):
        for channel in (0, 3):
            parent = network.tree(ranks, flip, channel)
            assert len(parent) == len(ranks) - 1  # a tree: every rank but the root
            for rank in ranks:  # every rank reaches the root without a cycle
                seen = set()
                while rank in parent:
                    assert rank not in seen
                    seen.add(rank)
                    rank = parent[rank]
    roots = {next(r for r in ranks if r not in network.tree(ranks, flip, 0)) for flip in
             (False, True)}
    assert len(roots) == 2  # the two trees are rooted apart
    small = {a: run_collective(system, "allreduce", 4096, None, a).latency_s
             for a in ("ring", "tree")}
    assert small["tree"] < small["ring"] / 2  # 2·log2(8) node hops against 2·(64 − 1)
    with pytest.raises(UserError, match="--algorithm"):
        run_collective(system, "allgather", 4096, None, "tree")


def test_nvls_reduces_in_the_switch_where_the_system_declares_it() -> None:
    """Every GPU sends S to the switch and receives the sum: ≈ S·β + chunk·β + 2α, against
    the ring's 2(n − 1)/n · S·β."""
    system, _ = load_system("dgx_h100.yaml")
    level = system.links[0]
    beta, alpha = 1 / (level.bandwidth * level.efficiency), level.latency.seconds
    size = 64 * CHUNK_BYTES
    nvls = run_collective(system, "allreduce", size, 8, "nvls").latency_s
    assert nvls == pytest.approx(size * beta + CHUNK_BYTES * beta + 2 * alpha, rel=1e-9)
    ring = run_collective(system, "allreduce", size, 8).latency_s
    assert nvls < ring


def test_a_hierarchical_alltoall_is_its_two_steps_closed_form() -> None:
    """Inside each node (w − 1) messages of N·s, then across nodes (N − 1) of w·s, with
    s = S/n the direct all-to-all's message."""
    system, _ = load_system("dgx_a100_cluster.yaml", {"nodes": 4})
    inner, outer = system.links
    b1, a1 = 1 / (inner.bandwidth * inner.efficiency), inner.latency.seconds
    b2, a2 = 1 / (outer.bandwidth * outer.efficiency), outer.latency.seconds
    size, w, nodes = 256 * 2**20, 8, 4
    s = size / (w * nodes)
    got = run_collective(system, "alltoall", size, None, "hierarchical").latency_s
    want = (w - 1) * nodes * s * b1 + a1 + (nodes - 1) * w * s * b2 + a2
    assert got == pytest.approx(want, rel=1e-9)
    one_node = run_collective(system, "alltoall", size, 8, "hierarchical").latency_s
    assert one_node == run_collective(system, "alltoall", size, 8).latency_s  # direct
