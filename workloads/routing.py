"""Mixture-of-experts routing on meta tensors: a policy says how many tokens each expert
gets in each MoE block, since a meta router has no values to route by.

- `balanced` (default): the T·k (token, expert) assignments spread evenly, each token's k
  experts distinct;
- `random:SEED`: each token picks k distinct experts uniformly at random;
- `zipf:S` (or `zipf:S:SEED`): experts' popularity falls as 1/rank^S (rank 1 the busiest),
  each token drawing k distinct experts by it;
- `file:PATH`: a JSON/YAML per-layer histogram of tokens per expert (e.g. measured): a
  list of per-expert lists, one per MoE block (or one for all), scaled to the step's T·k.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from simulator.errors import UserError
from simulator.yamlfile import load_yaml

POLICIES = ("balanced", "random:SEED", "zipf:S", "file:PATH")
#: Tokens drawn at a time by random and zipf (their memory: DRAW_CHUNK × experts floats).
DRAW_CHUNK = 1 << 14


class Routing(BaseModel):
    """A routing policy (and, for `file`, the histogram it read: the cache key holds it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["balanced", "random", "zipf", "file"] = "balanced"
    seed: int = 0
    skew: float = 0.0
    histogram: tuple[tuple[float, ...], ...] = ()

    def counts(self, layer: int, tokens: int, experts: int, top_k: int) -> list[int]:
        """Tokens each expert of MoE block number `layer` (0 = the first MoE block) gets."""
        if self.policy == "balanced":
            base, extra = divmod(tokens * top_k, experts)
            start = layer * extra % experts
            return [base + ((e - start) % experts < extra) for e in range(experts)]
        if self.policy == "file":
            row = self.histogram[0 if len(self.histogram) == 1 else layer]
            return _scaled(row, tokens, top_k)
        import numpy as np

        rng = np.random.default_rng([self.seed, layer, self.policy == "zipf"])
        weights = 1.0 / np.arange(1, experts + 1) ** (self.skew if self.policy == "zipf" else 0)
        counts = np.zeros(experts, dtype=np.int64)
        for start in range(0, tokens, DRAW_CHUNK):  # bounded memory for long prefills
            rows = min(DRAW_CHUNK, tokens - start)
            # k distinct experts per token, drawn by weight (Efraimidis–Spirakis keys u^(1/w))
            keys = np.log(rng.random((rows, experts)) + 1e-300) / weights
            chosen = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
            counts += np.bincount(chosen.ravel(), minlength=experts)
        return counts.tolist()

    def check(self, blocks: int, experts: int) -> None:
        """A histogram fits the model: one row, or one per MoE block, of `experts` values."""
        if self.policy != "file":
            return
        rows = len(self.histogram)
        if rows not in (1, blocks):
            raise UserError("--moe-routing", f"the histogram has {rows} rows; expected 1 (for "
                            f"every MoE block) or {blocks}, one per MoE block")
        for number, row in enumerate(self.histogram):
            if len(row) != experts:
                raise UserError("--moe-routing", f"row {number} of the histogram has "
                                f"{len(row)} experts; expected {experts}, the model's")


def _scaled(row: tuple[float, ...], tokens: int, top_k: int) -> list[int]:
    """`row`'s shares of the T·k assignments, none above T (a token picks an expert once):
    an expert at T passes its excess to the others in proportion to their shares, then
    largest remainders round; experts of share 0 get tokens only if the others are full."""
    want = tokens * top_k
    if sum(1 for v in row if v > 0) < top_k:  # too few experts to take every token k times
        row = tuple(v if v > 0 else min(v for v in row if v > 0) * 1e-9 for v in row) if any(
            row) else tuple(1.0 for _ in row)
    exact, full = [0.0] * len(row), set()
    left = float(want)
    while True:
        open_share = sum(v for e, v in enumerate(row) if e not in full)
        exact = [float(tokens) if e in full else left * v / open_share
                 for e, v in enumerate(row)]
        over = {e for e, x in enumerate(exact) if e not in full and x > tokens}
        if not over:
            break
        full |= over
        left = want - tokens * len(full)
    counts = [int(x) for x in exact]
    order = sorted(range(len(row)), key=lambda e: (exact[e] - counts[e], row[e]), reverse=True)
    for e in order:
        if sum(counts) >= want:
            break
        if counts[e] < tokens:
            counts[e] += 1
    return counts


def parse_routing(text: str) -> Routing:
    """The --moe-routing value: balanced, random:SEED, zipf:S[:SEED] or file:PATH."""
    flag = "--moe-routing"
    name, _, rest = text.partition(":")
    try:
        if text == "balanced":
            return Routing()
        if name == "random" and rest:
            return Routing(policy="random", seed=_seed(rest))
        if name == "zipf" and rest:
            skew, _, seed = rest.partition(":")
            value = float(skew)
            if not 0 <= value <= 10:
                raise ValueError
            return Routing(policy="zipf", skew=abs(value), seed=_seed(seed or "0"))
    except ValueError:
        pass
    else:
        if name == "file" and rest:
            return Routing(policy="file", histogram=_histogram(Path(rest)))
    raise UserError(flag, f"expected one of {', '.join(POLICIES)} (S a skew from 0 to 10, "
                    f"SEED a whole number), not {text!r}")


def _seed(text: str) -> int:
    seed = int(text)
    if seed < 0:
        raise ValueError
    return seed


def _histogram(path: Path) -> tuple[tuple[float, ...], ...]:
    where = f"--moe-routing file:{path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(where, f"cannot be read ({exc})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text, where)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}:{exc.lineno}", f"is not valid JSON: {exc.msg}") from None
    if isinstance(data, dict):
        data = data.get("layers")
    if (not isinstance(data, list) or not data or not all(
            isinstance(row, list) and row and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                and v >= 0 for v in row) and sum(row) > 0 for row in data)):
        raise UserError(where, "expected a list (or {layers: list}) of per-layer lists of "
                        "tokens per expert: non-negative numbers, not all zero")
    return tuple(tuple(float(v) for v in row) for row in data)
