"""Design-space sweeps: a grid of machines × models × phases, run in parallel, resumable.

    simulate sweep SPEC.yaml --out DIR [--scheduler ADDRESS] [--workers N]

A spec names hardware files, a grid of dotted YAML paths (values with units), models,
phases, batch sizes and mappings; every combination is a point. A spec with a `serve`
block is a serving sweep instead: hardware × grid × models × schedulers × replicas ×
arrival rates, each point a `simulate serve` run of the block's request workload at that
rate (the throughput–latency curve), its row the run's throughput and latency percentiles.
Each finished point is appended to DIR/points.jsonl at once (flushed and synced), so a
sweep killed at any moment loses nothing it finished and, started again, skips those
points; a torn last line is dropped. The table DIR/results.csv (one row per point, in spec
order) is written whole at the end. Points that do not fit the machine, or ask for a
mapping it does not declare (`scheduling.mappings`), are recorded as infeasible, not
dropped. DIR is created if its parent folder exists. Local processes by default; a Dask
cluster with `--scheduler`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from simulator.errors import Infeasible, UserError, first_error
from simulator.files import output_folder, write_atomic
from simulator.mapping import DEFAULT_GRANULARITY
from simulator.yamlfile import load_yaml

COLUMNS = ("key", "hardware", "settings", "model", "phase", "batch", "context", "prompt",
           "mapping", "status", "message", "latency_s", "tokens_per_s", "power_w",
           "energy_per_token_j", "memory_bytes", "weights_bytes", "dram_bytes", "moe_routing",
           "expert_imbalance")


SERVE_COLUMNS = ("key", "hardware", "settings", "model", "scheduler", "replicas", "rate",
                 "rate_per_s", "status", "message", "requests", "requests_per_s",
                 "output_tokens_per_s",
                 "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s",
                 "e2e_p99_s", "queue_p99_s", "preemptions", "energy_per_output_token_j",
                 "power_w", "makespan_s")


class ServeAxes(BaseModel):
    """A serving sweep: the request workload (as `simulate serve --requests`, its rate
    set per point) and the axes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: dict[str, Any] = Field(description="request spec (simulator/serving/requests.py)")
    #: arrival rates with their unit ('4 /s', '240 /min')
    rates: list[str] = Field(min_length=1)
    schedulers: list[str] = Field(default=["vllm"], min_length=1)
    replicas: list[int] = Field(default=[1], min_length=1)
    tp: int = Field(default=1, ge=1, strict=True)
    pp: int = Field(default=1, ge=1, strict=True)
    runtime: Literal["eager", "cuda_graphs"] | None = None
    #: serving options (simulator.serving.loop.Options fields), the same for every point
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("rates")
    @classmethod
    def _rates_have_units(cls, rates: list[str]) -> list[str]:
        from simulator.units import UnitError, parse

        for rate in rates:
            try:
                value = parse(rate, "frequency")
            except UnitError as exc:
                raise ValueError(f"{rate!r}: expected a rate with its unit, e.g. '4 /s' "
                                 f"({exc})") from None
            if not value > 0:
                raise ValueError(f"{rate!r}: expected a rate above zero")
        return rates

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        from simulator.serving.loop import Options

        fields = set(Options.__dataclass_fields__) - {"scheduler", "replicas", "record_steps"}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; expected one of "
                             f"{', '.join(sorted(fields))}")
        return options


class Spec(BaseModel):
    """A sweep: every combination of these lists is one point."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hardware: list[str] = Field(min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    models: list[str] = Field(min_length=1)
    phases: list[Literal["decode", "prefill", "forward"]] = Field(default=["decode"],
                                                                  min_length=1)
    batch: list[int] = Field(default=[1], min_length=1)
    #: null: each model's default (2048, or its positions if fewer)
    context: int | None = Field(default=2048, ge=0)
    prompt: int | None = Field(default=2048, ge=1)
    mapping: list[Literal["tensor", "batch"]] = Field(default=["tensor"], min_length=1)
    #: MoE routing policies (--moe-routing); null: the model's default, balanced
    moe_routing: list[str | None] = Field(default=[None], min_length=1)
    granularity: int = Field(default=DEFAULT_GRANULARITY, ge=1, strict=True,
                             description="max coalesced chunks per op and core")
    serve: ServeAxes | None = None

    @model_validator(mode="after")
    def _serving_has_its_own_axes(self) -> Spec:
        if self.serve is not None:
            engine = {"phases", "batch", "context", "prompt", "mapping", "moe_routing",
                      "granularity"} & self.model_fields_set
            if engine:
                raise ValueError(f"{', '.join(sorted(engine))}: not used by a serving "
                                 "sweep (its steps come from the serve block)")
        return self


def load_spec(path: str | Path) -> Spec:
    """Read and validate a sweep spec (a key given twice is an error)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(str(path), f"cannot be read ({exc})") from None
    data = load_yaml(text, str(path))
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        field, message = first_error(exc.errors())
        raise UserError(f"{path}: {field}", message) from None


def points(spec: Spec) -> list[dict[str, Any]]:
    """Every point of the spec, in order, each with a stable key."""
    paths = sorted(spec.grid)
    combos = list(itertools.product(*(spec.grid[p] for p in paths))) or [()]
    if spec.serve is not None:
        return _serve_points(spec, spec.serve, paths, combos)
    out = []
    for hardware, combo, model, phase, batch, mapping, routing in itertools.product(
            spec.hardware, combos, spec.models, spec.phases, spec.batch, spec.mapping,
            spec.moe_routing):
        point = {"hardware": hardware, "settings": dict(zip(paths, combo, strict=True)),
                 "model": model, "phase": phase, "batch": batch, "context": spec.context,
                 "prompt": spec.prompt, "mapping": mapping}
        # keys of default points stay as they were
        if spec.granularity != DEFAULT_GRANULARITY:
            point["granularity"] = spec.granularity
        if routing is not None:
            point["moe_routing"] = routing
        point["key"] = _key(point)
        out.append(point)
    return out


def _key(point: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:16]


def _serve_points(spec: Spec, serve: ServeAxes, paths: list[str],
                  combos: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    out = []
    for hardware, combo, model, scheduler, replicas, rate in itertools.product(
            spec.hardware, combos, spec.models, serve.schedulers, serve.replicas,
            serve.rates):
        point = {"kind": "serve", "hardware": hardware,
                 "settings": dict(zip(paths, combo, strict=True)), "model": model,
                 "scheduler": scheduler, "replicas": replicas, "rate": rate,
                 "requests": serve.requests, "options": serve.options, "tp": serve.tp,
                 "pp": serve.pp, "runtime": serve.runtime}
        point["key"] = _key(point)
        out.append(point)
    return out


def run_serve_point(point: dict[str, Any]) -> dict[str, Any]:
    """Serve one point's workload at its rate; bad points come back as rows too."""
    from simulator.serving.loop import Options
    from simulator.serving.requests import load_spec as load_requests
    from simulator.serving.serve import run_serving

    row: dict[str, Any] = {k: v for k, v in point.items()
                           if k not in ("requests", "options", "tp", "pp", "runtime")}
    row["settings"] = json.dumps(point["settings"], sort_keys=True)
    rate = point["rate"]
    try:
        requests = load_requests({**point["requests"], "rate": rate}, "serve.requests")
        row["rate_per_s"] = requests.rate_per_s()
        options = Options(scheduler=point["scheduler"], replicas=point["replicas"],
                          **point["options"])
        done = run_serving(point["hardware"], point["model"], requests, options,
                           tp=point["tp"], pp=point["pp"], runtime=point["runtime"],
                           hw_set=point["settings"])
    except UserError as exc:
        return {**row, "status": "infeasible" if isinstance(exc, Infeasible) else "error",
                "message": str(exc)}
    s = done.summary
    return {**row, "status": "ok", "message": "", "requests": s["requests"],
            **{name: s[name] for name in ("requests_per_s", "output_tokens_per_s",
                                          "preemptions", "energy_per_output_token_j",
                                          "power_w", "makespan_s")},
            **{f"{metric}_{p}_s": s[f"{metric}_s"][p] for metric in ("ttft", "tpot", "e2e")
               for p in ("p50", "p99")},
            "queue_p99_s": s["queue_s"]["p99"]}


def run_point(point: dict[str, Any]) -> dict[str, Any]:
    """Simulate one point; bad or infeasible points come back as rows too."""
    from simulator.api import simulate

    if point.get("kind") == "serve":
        return run_serve_point(point)
    row: dict[str, Any] = {**point, "settings": json.dumps(point["settings"], sort_keys=True)}
    try:
        result = simulate(point["hardware"], point["model"], phase=point["phase"],
                          batch=point["batch"], context=point["context"],
                          prompt=point["prompt"], mapping=point["mapping"],
                          hw_set=point["settings"],
                          granularity=point.get("granularity", DEFAULT_GRANULARITY),
                          moe_routing=point.get("moe_routing"))
    except UserError as exc:
        return {**row, "status": "infeasible" if isinstance(exc, Infeasible) else "error",
                "message": str(exc)}
    return {**row, "status": "ok", "message": "",
            **{name: getattr(result, name) for name in COLUMNS if hasattr(result, name)
               and name not in row}}


def _read_log(log: Path) -> dict[str, dict[str, Any]]:
    """Finished rows by key; a torn last line (killed mid-write) is dropped."""
    if not log.exists():
        return {}
    done, good = {}, []
    for line in log.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and isinstance(row, dict) and "key" in row:
            done[row["key"]] = row
            good.append(line)
    if sum(map(len, good)) != log.stat().st_size:
        write_atomic(log, "".join(good), "--out")
    return done


def _append(handle: Any, row: dict[str, Any]) -> None:
    handle.write(json.dumps(row, sort_keys=True) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _execute(todo: list[dict[str, Any]], scheduler: str | None, workers: int
             ) -> Iterator[dict[str, Any]]:
    if not todo:
        return
    if scheduler:
        from distributed import Client
        from distributed import as_completed as dask_completed

        try:
            client = Client(scheduler, timeout="10s")
        except OSError as exc:
            raise UserError("--scheduler", f"cannot reach {scheduler} ({exc})") from None
        with client:
            futures = client.map(run_point, todo, pure=False)
            for future in dask_completed(futures):
                yield future.result()
        return
    if workers <= 1:
        yield from map(run_point, todo)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for future in as_completed(pool.submit(run_point, point) for point in todo):
            yield future.result()


def to_csv(rows: Iterable[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return out.getvalue()


def run_sweep(spec_path: str | Path, out: str | Path, scheduler: str | None = None,
              workers: int | None = None, progress: bool = True) -> Path:
    """Run (or finish) a sweep; returns the path of the results table."""
    spec = load_spec(spec_path)
    everything = points(spec)
    folder = output_folder(out, "--out")
    log = folder / "points.jsonl"
    done = _read_log(log)
    todo = [p for p in everything if p["key"] not in done]
    workers = workers or os.cpu_count() or 1
    with open(log, "a", encoding="utf-8") as handle, _progress(progress) as bar:
        task = bar.add_task("sweep", total=len(everything), completed=len(everything) - len(todo))
        for row in _execute(todo, scheduler, workers):
            _append(handle, row)
            done[row["key"]] = row
            bar.advance(task)
    table = folder / "results.csv"
    columns = SERVE_COLUMNS if spec.serve is not None else COLUMNS
    write_atomic(table, to_csv((done[p["key"]] for p in everything), columns), "--out")
    return table


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    disable=not enabled)


def load(out: str | Path) -> Any:
    """The results table of a finished sweep as a pandas DataFrame."""
    import pandas as pd

    path = Path(out) / "results.csv"
    if not path.is_file():
        raise UserError(str(out), "no results.csv: run `simulate sweep SPEC --out` first")
    return pd.read_csv(path)
