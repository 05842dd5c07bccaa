"""The kinds of model `--model` names, and the `python:` form (any nn.Module).

- `ModelConfig`: our own modules (llama, hgrn_bit), with structured compression;
- `HFConfig`: an architecture transformers builds from its config.json;
- `ModuleModel`: `python:pkg.module:factory`, a function returning `(module,
  example_inputs)` built on the meta device (one forward pass; a `batch` keyword, if the
  factory takes one, receives --batch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from simulator.errors import UserError
from workloads.config import ModelConfig, check_phase
from workloads.hf_config import HFConfig

PREFIX = "python:"


class ModuleModel(BaseModel):
    """A user's nn.Module from a factory (`module:function`), keyed by its source's hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    module: str
    factory: str
    source_sha256: str
    name: str = ""

    #: What `simulate list` and the step checks read (a module is sized only when built).
    model_type: ClassVar[str] = "python"
    position_limit: ClassVar[None] = None
    phases: ClassVar[tuple[str, ...]] = ("forward",)

    def key(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)

    def check_positions(self, phase: str, context: int, prompt: int) -> None:
        check_phase(self.name, phase, self.phases)


def resolve_module(spec: str) -> ModuleModel:
    """`python:pkg.module:factory` → a ModuleModel (the module's file is found, not run)."""
    target = spec.removeprefix(PREFIX)
    module, _, factory = target.partition(":")
    if not module or not factory.isidentifier():
        raise UserError("--model", f"'{spec}': expected python:package.module:function")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise UserError("--model", f"'{spec}': module {module} not found on the Python path")
    if not found.origin or not found.has_location:
        raise UserError("--model", f"'{spec}': module {module} has no source file (built in "
                        "or frozen); expected a module of yours that defines the factory")
    with open(found.origin, "rb") as source:
        digest = hashlib.sha256(source.read()).hexdigest()
    return ModuleModel(module=module, factory=factory, source_sha256=digest,
                       name=f"{module}:{factory}")


AnyModel = ModelConfig | HFConfig | ModuleModel
