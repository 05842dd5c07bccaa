"""The HF config fields each supported architecture takes, read from the pinned transformers.

`python -m workloads.hf_schema` rewrites `hf_fields.json` (imports transformers); the
config checks read that file, so resolving a model never imports transformers. A test
checks the file against the installed transformers.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from workloads.hf_config import HF_TASKS

FIELDS_FILE = Path(__file__).resolve().parent / "hf_fields.json"


def _plain(value: Any) -> Any:
    """A JSON value of a config default (label maps keyed by text, sub-configs dropped)."""
    return json.loads(json.dumps(value, default=lambda _: None))


def _default(field: Any) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _schema(cls: type) -> dict[str, Any]:
    """A config class's fields with their declared defaults (None where transformers
    derives the value, e.g. head_dim), aliases and sub-config classes."""
    subs = getattr(cls, "sub_configs", {}) or {}
    defaults = {field.name: _plain(_default(field)) for field in dataclasses.fields(cls)
                if not field.name.startswith("_") and field.name not in subs}
    return {"defaults": dict(sorted(defaults.items())),
            "aliases": dict(sorted(cls.attribute_map.items())),
            "sub_configs": {name: _schema(sub) for name, sub in sorted(subs.items())}}


def schema() -> dict[str, Any]:
    """{"transformers": version, "models": {model_type: schema}} from transformers itself."""
    from transformers import AutoConfig

    return {"transformers": metadata.version("transformers"),
            "models": {kind: _schema(type(AutoConfig.for_model(kind))) for kind in HF_TASKS}}


def main() -> None:
    FIELDS_FILE.write_text(json.dumps(schema(), indent=1, sort_keys=True) + "\n",
                           encoding="utf-8")
    print(f"wrote {FIELDS_FILE}")


if __name__ == "__main__":
    main()
