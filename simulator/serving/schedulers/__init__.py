"""Batch schedulers for the serving loop: each decides, between steps, which sequences the
next step runs (simulator.serving.loop runs it). One module per policy."""

from __future__ import annotations

from simulator.serving.schedulers.base import Running, Scheduler, Step
from simulator.serving.schedulers.instances import Instances
from simulator.serving.schedulers.orca import Orca
from simulator.serving.schedulers.static import Static
from simulator.serving.schedulers.vllm import Vllm

SCHEDULERS: dict[str, type[Scheduler]] = {
    "static": Static, "instances": Instances, "orca": Orca, "flover": Orca, "vllm": Vllm}

__all__ = ["SCHEDULERS", "Instances", "Orca", "Running", "Scheduler", "Static", "Step", "Vllm"]
