"""Batch schedulers for the serving loop: each decides, between steps, which sequences the
next step runs (simulator.serving.loop runs it). One module per policy."""

from __future__ import annotations

from simulator.serving.schedulers.base import Running, Scheduler, Step
from simulator.serving.schedulers.flover import Flover
from simulator.serving.schedulers.instances import Instances
from simulator.serving.schedulers.orca import Orca
from simulator.serving.schedulers.sarathi import Sarathi
from simulator.serving.schedulers.static import Static
from simulator.serving.schedulers.vllm import Vllm

SCHEDULERS: dict[str, type[Scheduler]] = {
    "static": Static, "instances": Instances, "orca": Orca, "flover": Flover, "vllm": Vllm,
    "sarathi": Sarathi}

__all__ = ["SCHEDULERS", "Flover", "Instances", "Orca", "Running", "Sarathi", "Scheduler",
           "Static", "Step", "Vllm"]
