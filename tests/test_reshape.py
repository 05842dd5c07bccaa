"""Derived traces (simulator.workload.reshape) against real captures, bit for bit."""

from __future__ import annotations

import pytest

from simulator.workload import reshape
from simulator.workload.cache import get_trace
from simulator.workload.trace import Phase, Trace
from workloads.config import resolve_model


def _capture(cfg):  # type: ignore[no-untyped-def]
    def capture(phase: str, batch: int, length: int) -> Trace:
        return get_trace(cfg, phase, batch, length if phase == "decode" else 0,  # type: ignore[arg-type]
                         length if phase == "prefill" else 0)
    return capture


LLAMA = ("llama2-7b", {"num_hidden_layers": "2"})
GPTJ = ("gpt-j-6b", {"n_layer": "1"})
MMFREE = ("mmfree-370m", {"num_hidden_layers": "1"})


@pytest.mark.parametrize(("model", "depth", "phase"), [
    (*LLAMA, "decode"), (*LLAMA, "prefill"), (*GPTJ, "decode"), (*MMFREE, "decode"),
    (*MMFREE, "prefill")])
def test_derived_traces_are_the_captures(model: str, depth: dict[str, str],
                                         phase: Phase) -> None:
    cfg = resolve_model(model, depth, None)
    reshaper = reshape.checked_reshaper(phase, _capture(cfg), cfg.position_limit)
    assert reshaper is not None
    for batch, length in [(1, 2), (3, 17), (40, 700), (129, 1023)]:
        derived = reshaper.derive(batch, length)
        captured = get_trace(cfg, phase, batch, length if phase == "decode" else 0,
                             length if phase == "prefill" else 0, use_cache=False)
        assert derived.to_json() == captured.to_json(), (batch, length)


def test_a_one_token_prompt_is_captured_not_derived() -> None:
    """A one-token prompt is traced without a causal mask: off the polynomial."""
    cfg = resolve_model("llama2-7b", {"num_hidden_layers": "1"}, None)
    reshaper = reshape.checked_reshaper("prefill", _capture(cfg), cfg.position_limit)
    assert reshaper is not None
    captured = get_trace(cfg, "prefill", 2, 0, 1, use_cache=False)
    assert reshaper.derive(2, 1) != captured
    assert reshape.derived(cfg.key(), "prefill", 2, 1, _capture(cfg), cfg.position_limit) is None
    through_cache = get_trace(cfg, "prefill", 2, 0, 1, derive=True)
    assert through_cache.to_json() == captured.to_json()


@pytest.mark.parametrize(("model", "depth", "phase"), [
    ("mixtral-8x7b", {"num_hidden_layers": "1"}, "decode"),
    ("mistral-7b", {"num_hidden_layers": "1"}, "decode"), (*GPTJ, "prefill")])
def test_traces_off_one_polynomial_are_not_derived(model: str, depth: dict[str, str],
                                                   phase: Phase) -> None:
    """MoE traces carry the tokens each expert got; Mistral's cache stops growing at its
    4,096-token window; GPT-J's rotary gather counts the larger of its table and its output,
    which changes sides past 2,048 × 64 elements. The checks find each: they are captured."""
    cfg = resolve_model(model, depth, None)
    assert reshape.checked_reshaper(phase, _capture(cfg), cfg.position_limit) is None


def test_a_count_off_the_polynomial_refuses_the_shape() -> None:
    cfg = resolve_model("llama2-7b", {"num_hidden_layers": "1"}, None)
    grid = {(b, n): get_trace(cfg, "decode", b, n, 0) for b in (2, 3) for n in (64, 96)}
    bent = dict(grid)
    trace = bent[3, 96]
    bent[3, 96] = Trace(**{**trace.__dict__, "tokens": trace.tokens + 1})
    with pytest.raises(reshape.NotPolynomial):
        reshape.Reshaper("decode", bent).derive(4, 100)
    assert reshape.Reshaper("decode", grid).derive(4, 100).tokens == 4
