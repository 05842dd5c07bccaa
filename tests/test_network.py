"""Systems of devices and links, and collectives as events (issue "Many devices")."""

from __future__ import annotations

import json

import pytest
import simpy

from simulator.calibration.links import FITS, HELD_OUT, fit_efficiency
from simulator.cli import main
from simulator.collective import KINDS, bus_factor, run_collective
from simulator.engine.network import CHUNK_BYTES, Network
from simulator.hardware.loader import shipped, shipped_systems
from simulator.hardware.system import load_system


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
    for name, kind, nbytes, devices, busbw, _ in FITS:
        system, _ = load_system(name)
        assert fit_efficiency(name, kind, nbytes, devices, busbw) == pytest.approx(
            system.links[0].efficiency, abs=1e-4)
    for name, kind, nbytes, devices, busbw, _ in HELD_OUT:
        system, _ = load_system(name)
        got = run_collective(system, kind, nbytes, devices).busbw_bytes_per_s
        assert abs(got / busbw - 1) <= 0.15


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
    (["--hw", "dgx_a100.yaml", "--bytes", "1GiB", "--algorithm", "tree"], "--algorithm"),
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
    assert main(["--hw", "dgx_a100.yaml", "--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "system" in err
