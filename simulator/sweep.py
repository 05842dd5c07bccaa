"""Design-space sweeps: a grid of machines × models × phases, run in parallel, resumable.

    simulate sweep SPEC.yaml --out DIR [--scheduler ADDRESS] [--workers N]

A spec names hardware files, a grid of dotted YAML paths (values with units), models,
phases, batch sizes and mappings; every combination is a point. Each finished point is
appended to DIR/points.jsonl at once (flushed and synced), so a sweep killed at any moment
loses nothing it finished and, started again, skips those points; a torn last line is
dropped. The table DIR/results.csv (one row per point, in spec order) is written whole at
the end. Points that do not fit the machine, or ask for a mapping it does not declare
(`scheduling.mappings`), are recorded as infeasible, not dropped. DIR is created if its
parent folder exists. Local processes by default; a Dask cluster with `--scheduler`.
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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from simulator.errors import Infeasible, UserError, first_error
from simulator.files import output_folder, write_atomic
from simulator.mapping import DEFAULT_GRANULARITY
from simulator.yamlfile import load_yaml

COLUMNS = ("key", "hardware", "settings", "model", "phase", "batch", "context", "prompt",
           "mapping", "status", "message", "latency_s", "tokens_per_s", "power_w",
           "energy_per_token_j", "memory_bytes", "weights_bytes", "dram_bytes", "moe_routing",
           "expert_imbalance")


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
        point["key"] = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:16]
        out.append(point)
    return out


def run_point(point: dict[str, Any]) -> dict[str, Any]:
    """Simulate one point; bad or infeasible points come back as rows too."""
    from simulator.api import simulate

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


def to_csv(rows: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore",
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
    write_atomic(table, to_csv(done[p["key"]] for p in everything), "--out")
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
