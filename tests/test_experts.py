"""Expert parallelism: placements, dispatch/combine all-to-alls, ExFlow's coherent runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.api import simulate
from simulator.cli import main
from simulator.collective import run_alltoallv
from simulator.errors import UserError
from simulator.experts import contiguous, load_placement
from simulator.hardware.system import load_system
from simulator.parallel import resident_weights, split_pipeline
from simulator.workload.cache import get_trace
from workloads.config import resolve_model

TWO = {"num_hidden_layers": "2"}
MIXTRAL = ["--hw", "dgx_a100.yaml", "--model", "mixtral-8x7b", "--model-set",
           "num_hidden_layers=2"]


def _alltoall(result: object) -> list:
    return [c for c in result.system.collectives if c.collective == "alltoall"]  # type: ignore[attr-defined]


def test_an_uneven_alltoall_on_idle_links_is_its_closed_form() -> None:
    """Each device's n − 1 messages leave one after another from its port: (n−1)·b·β + α;
    a device that sends nothing adds nothing."""
    system, _ = load_system("dgx_a100.yaml")
    level = system.links[0]
    beta, alpha = 1 / (level.bandwidth * level.efficiency), level.latency.seconds
    b = 3e6
    for n in (2, 4, 8):
        even = [[0.0 if s == d else b for d in range(n)] for s in range(n)]
        assert run_alltoallv(system, even) == pytest.approx((n - 1) * b * beta + alpha,
                                                            rel=1e-9)
    lopsided = [[0.0, b, b, b], [0.0] * 4, [0.0] * 4, [0.0] * 4]
    assert run_alltoallv(system, lopsided) == pytest.approx(3 * b * beta + alpha, rel=1e-9)


def test_contiguous_ep_places_whole_experts_and_sizes_its_alltoalls_by_routing() -> None:
    one = simulate("dgx_a100.yaml", "mixtral-8x7b", model_set=TWO, batch=8, phase="prefill",
                   prompt=64)
    eight = simulate("dgx_a100.yaml", "mixtral-8x7b", model_set=TWO, batch=8, phase="prefill",
                     prompt=64, ep=8)
    assert eight.system is not None and eight.system.ep == 8 and eight.system.devices == 8
    expert = 3 * 4096 * 14336 * 2  # gate, up and down of one expert, bf16
    assert one.weights_bytes - eight.system.device_weights_bytes == 2 * 7 * expert
    assert eight.system.device_state_bytes * 8 == one.state_bytes  # a sequence per device
    moves = _alltoall(eight)
    assert [c.count for c in moves] == [4]  # a dispatch and a combine per MoE block
    tokens, k, row = 8 * 64, 2, 4096 * 2
    assert moves[0].bytes == tokens * k // 8 * 7 // 8 * row  # 7/8 of a device's rows leave
    assert eight.latency_s < one.latency_s


def test_ep_degrees_and_modes_that_do_not_fit_are_one_line(capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    cases = [
        ([*MIXTRAL, "--ep", "3"], "--ep"),  # 8 experts
        ([*MIXTRAL, "--ep", "16"], "--ep"),  # 16 devices on 8
        (["--hw", "dgx_a100.yaml", "--model", "llama2-7b", "--model-set",
          "num_hidden_layers=2", "--ep", "2"], "--ep"),  # no experts
        ([*MIXTRAL, "--ep", "2", "--ep-mode", "coherent", "--phase", "prefill"], "--ep-mode"),
        ([*MIXTRAL, "--placement", "exflow_mixtral_8gpu.yaml"], "--placement"),  # no --ep
        ([*MIXTRAL, "--ep", "8", "--placement", "exflow_mixtral_8gpu.yaml"], "--placement"),
        ([*MIXTRAL, "--ep", "8", "--placement", "nowhere.yaml"], "--placement"),
    ]
    for args, flag in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err, (args, err)


@pytest.mark.parametrize(("text", "field"), [
    ("placement: [[0, 1, 2]]\n", "block 0"),
    ("placement: [[0, 1, 2, 3, 4, 5, 6, 9]]\n", "block 0"),
    ("placement: [[0, 1, 2, 3, 4, 5, 6, 7]]\ncross_device_hop: 1\n", "cross_device_hop"),
    ("placement: [[0, 1, 2, 3, 4, 5, 6, 7]]\ncross_device_hops: 5\n", "cross_device_hops"),
    ("placement: [[0, 1\n", "--placement"),
])
def test_bad_placement_files_are_named(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_placement(path, 8, 2, 8)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_the_shipped_exflow_placements_match_their_csv_form(tmp_path: Path) -> None:
    eight = load_placement("exflow_mixtral_8gpu.yaml", 8, 32, 8)
    assert eight.cross_device_hops == pytest.approx(22.166, abs=1e-3)
    assert all(sorted(row) == list(range(8)) for row in eight.table)  # one expert per GPU
    rows = [f"{b * 8 + e},{d}" for b, row in enumerate(eight.table) for e, d in enumerate(row)]
    csv = tmp_path / "solution.csv"
    csv.write_text("Expert,Node\r\n" + "\r\n".join(rows) + "\r\n")
    assert load_placement(csv, 8, 32, 8).table == eight.table
    four = load_placement("exflow_mixtral_4gpu.yaml", 4, 32, 8)
    assert all(sorted(row) == [0, 0, 1, 1, 2, 2, 3, 3] for row in four.table)
    assert contiguous(32, 8, 4).table[0] == (0, 0, 1, 1, 2, 2, 3, 3)


def _ratio(tmp_path: Path, hops: float | None, top_k: str = "2") -> tuple[float, float]:
    """All-to-all seconds of (combine with contiguous experts, coherent with a placement of
    `hops` cross-device transitions) for a 2-block Mixtral decode at batch 64."""
    path = tmp_path / "p.yaml"
    path.write_text("placement: [[0, 1, 2, 3, 4, 5, 6, 7]]\n" +
                    ("" if hops is None else f"cross_device_hops: {hops}\n"))
    kw = {"model_set": {**TWO, "num_experts_per_tok": top_k}, "batch": 64, "context": 64,
          "ep": 8}
    combine = simulate("dgx_a100.yaml", "mixtral-8x7b", **kw)
    coherent = simulate("dgx_a100.yaml", "mixtral-8x7b", **kw, placement=path,
                        ep_mode="coherent")
    assert coherent.system is not None and coherent.system.device_state_bytes == (
        combine.state_bytes)  # the whole KV cache on every device
    gathers = [c for c in coherent.system.collectives if c.collective == "allgather"]
    assert [g.count for g in gathers] == [1] and gathers[0].bytes == 64 * 4096 * 2
    return (sum(c.time_s for c in _alltoall(combine)),
            sum(c.time_s for c in _alltoall(coherent)))


def test_coherent_ep_drops_the_combine_and_affinity_cuts_the_dispatch(tmp_path: Path) -> None:
    combine, independent = _ratio(tmp_path, None, "1")
    _, affine = _ratio(tmp_path, 0.25, "1")
    _, local = _ratio(tmp_path, 0.0, "1")
    assert local < affine < independent < combine  # fewer hops, less routing time
    _, top2 = _ratio(tmp_path, 0.25)
    combine2, _ = _ratio(tmp_path, None)
    assert top2 < combine2  # top-2 keeps a partial combine but still saves


def test_pipeline_stages_hold_the_embedding_table_and_the_unrouted_experts() -> None:
    for name in ("llama2-7b", "mixtral-8x7b"):
        trace = get_trace(resolve_model(name, {"num_hidden_layers": "4"}), "decode", 1, 64, 0)
        stages = split_pipeline(trace, 2)
        assert sum(stage.weights_bytes for stage in stages) == trace.weights_bytes, name
        assert sum(resident_weights(trace).values()) == trace.weights_bytes, name
