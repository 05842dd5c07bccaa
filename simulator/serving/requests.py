"""Request workloads for serving: when requests arrive and how long their prompts and
outputs are.

A spec (YAML, or the `simulate serve` flags) names:
- `arrival`: `poisson` (exponential gaps at `rate`), `gamma` (gaps of mean 1/`rate` and
  coefficient of variation `cv`; cv 1 is Poisson), `fixed` (one every 1/`rate`), `burst`
  (all at t = 0, as Flover's Fig. 4) or `trace` (the times in `trace`);
- `rate`: requests per unit time with its unit ("4 /s", "240 /min");
- `num_requests`; `seed` (the same seed gives the same requests, bit for bit);
- `prompt`, `output`: a whole number of tokens, or `{dist: fixed, value: N}`,
  `{dist: uniform, low: A, high: B}` (inclusive), `{dist: zipf, exponent: S, low: A,
  high: B}` (P(n) ∝ n^−S on A … B), or `trace` (the file's lengths, in its order);
- `trace`: a CSV file: the Azure LLM inference traces' `TIMESTAMP, ContextTokens,
  GeneratedTokens` or Vidur's processed traces' `arrived_at, num_prefill_tokens,
  num_decode_tokens` (its length-only traces lack `arrived_at`; use them with a synthetic
  arrival). Times are made relative to the first request.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from simulator.errors import UserError, first_error
from simulator.units import UnitError, parse

Arrival = Literal["poisson", "gamma", "fixed", "burst", "trace"]
ARRIVALS: tuple[Arrival, ...] = ("poisson", "gamma", "fixed", "burst", "trace")
#: The trace layouts read: (arrival column or None, prompt column, output column).
LAYOUTS = (("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
           ("arrived_at", "num_prefill_tokens", "num_decode_tokens"),
           (None, "ContextTokens", "GeneratedTokens"),
           (None, "num_prefill_tokens", "num_decode_tokens"))


@dataclass(frozen=True)
class Request:
    """One request: when it arrives (s, from the first) and its prompt and output tokens."""

    id: int
    arrival_s: float
    prompt: int
    output: int


class Lengths(BaseModel):
    """A distribution of token counts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dist: Literal["fixed", "uniform", "zipf"] = "fixed"
    value: int | None = Field(default=None, ge=1, strict=True)
    low: int | None = Field(default=None, ge=1, strict=True)
    high: int | None = Field(default=None, ge=1, strict=True)
    exponent: float = Field(default=1.0, gt=0)

    def check(self) -> None:
        if self.dist == "fixed" and self.value is None:
            raise ValueError("a fixed length needs 'value'")
        if self.dist != "fixed" and (self.low is None or self.high is None
                                     or self.low > self.high):
            raise ValueError(f"a {self.dist} length needs 'low' ≤ 'high'")

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.dist == "fixed":
            return np.full(n, self.value, dtype=np.int64)
        assert self.low is not None and self.high is not None
        if self.dist == "uniform":
            return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)
        support = np.arange(self.low, self.high + 1)
        weights = support.astype(float) ** -self.exponent
        return rng.choice(support, size=n, p=weights / weights.sum()).astype(np.int64)


LengthSpec = int | Lengths | Literal["trace"]


class RequestSpec(BaseModel):
    """What `simulate serve --requests SPEC.yaml` reads (see the module notes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arrival: Arrival = "poisson"
    rate: str | None = Field(default=None, description="requests per unit time, e.g. '4 /s'")
    cv: float = Field(default=1.0, gt=0, description="gamma: gaps' coefficient of variation")
    num_requests: int | None = Field(default=None, ge=1, strict=True)
    prompt: LengthSpec = 512
    output: LengthSpec = 128
    seed: int = Field(default=0, ge=0, strict=True)
    trace: str | None = None

    @field_validator("prompt", "output", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, int) and value < 1):
            raise ValueError(f"expected a whole number of tokens ≥ 1, not {value!r}")
        return value

    @field_validator("rate", mode="before")
    @classmethod
    def _rate_text(cls, value: Any) -> Any:
        return value if value is None or isinstance(value, str) else _no_unit(value)

    def rate_per_s(self) -> float:
        """The arrival rate in requests per second."""
        if self.rate is None:
            raise UserError("rate", f"{self.arrival} arrivals need a rate, e.g. '4 /s'")
        try:
            value = parse(self.rate, "frequency")
        except UnitError as exc:
            raise UserError("rate", str(exc).replace("frequency", "rate")) from None
        if not value > 0:
            raise UserError("rate", f"expected a rate above zero, e.g. '4 /s', not {self.rate!r}")
        return value


def _no_unit(value: Any) -> Any:
    raise ValueError(f"{value!r} has no unit; expected a rate, e.g. '4 /s'")


def load_spec(data: Any, shown: str) -> RequestSpec:
    """A RequestSpec from parsed YAML `data` (named `shown` in errors)."""
    if not isinstance(data, dict):
        raise UserError(shown, "expected a mapping of arrival, rate, num_requests, prompt, "
                               "output, seed, trace")
    try:
        spec = RequestSpec(**data)
        for name in ("prompt", "output"):
            lengths = getattr(spec, name)
            if isinstance(lengths, Lengths):
                try:
                    lengths.check()
                except ValueError as exc:
                    raise UserError(f"{shown}: {name}", str(exc)) from None
    except ValidationError as exc:
        where, message = first_error(exc.errors())
        raise UserError(f"{shown}: {where}", message) from None
    return spec


@dataclass(frozen=True)
class _Trace:
    arrivals: np.ndarray | None
    prompts: np.ndarray
    outputs: np.ndarray


def read_trace(path: str | Path) -> _Trace:
    """A request trace CSV in one of LAYOUTS; one-line errors name the file."""
    shown = f"trace {path}"
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in reader.fieldnames or []]
            rows = list(reader)
    except OSError as exc:
        raise UserError(shown, f"cannot read it ({exc.strerror})") from None
    layout = next((lay for lay in LAYOUTS if all(c is None or c in columns for c in lay)),
                  None)
    if layout is None:
        raise UserError(shown, f"expected the columns TIMESTAMP, ContextTokens, GeneratedTokens"
                               f" (Azure) or [arrived_at,] num_prefill_tokens, "
                               f"num_decode_tokens (Vidur); found {', '.join(columns) or 'none'}")
    if not rows:
        raise UserError(shown, "has no requests")
    time, prompt, output = layout
    lengths = []
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): v for k, v in row.items() if k is not None}
        try:
            pair = (int(float(row[prompt])), int(float(row[output])))
        except (TypeError, ValueError):
            raise UserError(f"{shown}:{line}", f"expected whole token counts in {prompt} and "
                                               f"{output}") from None
        if min(pair) < 1:
            raise UserError(f"{shown}:{line}", f"expected token counts ≥ 1, not {pair}")
        lengths.append(pair)
    arrivals = None
    if time is not None:
        arrivals = np.array([_seconds(row[time].strip(), f"{shown}:{line}", time)
                             for line, row in enumerate(rows, start=2)])
        if np.any(np.diff(arrivals) < 0):
            line = int(np.argmax(np.diff(arrivals) < 0)) + 3
            raise UserError(f"{shown}:{line}", f"arrives before the row above; expected "
                                               f"{time} in increasing order")
        arrivals = arrivals - arrivals[0]
    pairs = np.array(lengths, dtype=np.int64)
    return _Trace(arrivals, pairs[:, 0], pairs[:, 1])


def _seconds(text: str, where: str, column: str) -> float:
    """A trace time: seconds (Vidur's arrived_at) or a date-time (Azure's TIMESTAMP)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:  # Azure: "2023-11-16 18:15:46.6805900" (7 fractional digits)
        head, _, fraction = text.partition(".")
        stamp = datetime.fromisoformat(head)
        return stamp.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)
    except ValueError:
        raise UserError(where, f"expected {column} in seconds or as a date-time, not "
                               f"{text!r}") from None


def make_requests(spec: RequestSpec) -> list[Request]:
    """The requests `spec` describes, in arrival order."""
    rng = np.random.default_rng(spec.seed)
    trace = read_trace(spec.trace) if spec.trace is not None else None
    uses_trace = spec.arrival == "trace" or "trace" in (spec.prompt, spec.output)
    if uses_trace and trace is None:
        raise UserError("trace", "arrival or lengths 'trace' need a trace file")
    if spec.arrival == "trace" and trace is not None and trace.arrivals is None:
        raise UserError("arrival", f"{spec.trace} has no arrival times (a length-only trace);"
                                   " expected a synthetic arrival with it")
    available = len(trace.prompts) if trace is not None else None
    n = spec.num_requests or (available if uses_trace else None)
    if n is None:
        raise UserError("num_requests", "expected how many requests (or a trace to take them "
                                        "from)")
    if uses_trace and available is not None and n > available:
        raise UserError("num_requests", f"{spec.trace} holds {available} requests, not {n}")
    if spec.arrival == "trace":
        assert trace is not None and trace.arrivals is not None
        times = trace.arrivals[:n]
    elif spec.arrival == "burst":
        times = np.zeros(n)
    else:
        rate = spec.rate_per_s()
        if spec.arrival == "fixed":
            gaps = np.full(n, 1 / rate)
        elif spec.arrival == "poisson":
            gaps = rng.exponential(1 / rate, size=n)
        else:  # gamma with mean 1/rate and CV cv: shape 1/cv², scale cv²/rate
            gaps = rng.gamma(1 / spec.cv**2, spec.cv**2 / rate, size=n)
        times = np.concatenate([[0.0], np.cumsum(gaps[1:])])

    def lengths(which: LengthSpec, column: np.ndarray | None) -> np.ndarray:
        if which == "trace":
            assert column is not None
            return column[:n]
        if isinstance(which, int):
            return np.full(n, which, dtype=np.int64)
        return which.draw(rng, n)

    prompts = lengths(spec.prompt, trace.prompts if trace is not None else None)
    outputs = lengths(spec.output, trace.outputs if trace is not None else None)
    return [Request(i, float(times[i]), int(prompts[i]), int(outputs[i])) for i in range(n)]


def summary(requests: list[Request]) -> dict[str, float]:
    """Counts and means of a workload (for the report)."""
    span = requests[-1].arrival_s - requests[0].arrival_s if requests else 0.0
    return {"requests": len(requests),
            "mean_prompt_tokens": float(np.mean([r.prompt for r in requests])),
            "mean_output_tokens": float(np.mean([r.output for r in requests])),
            "offered_rate_per_s": (len(requests) - 1) / span if span > 0 else math.inf}
