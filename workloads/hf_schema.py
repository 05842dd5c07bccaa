"""The HF config fields each supported architecture takes, read from the pinned transformers.

`python -m workloads.hf_schema` rewrites `hf_fields.json` (imports transformers); the
config checks read that file, so resolving a model never imports transformers. A test
checks the file against the installed transformers.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from workloads.hf_config import HF_TASKS

FIELDS_FILE = Path(__file__).resolve().parent / "hf_fields.json"


def _plain(value: Any) -> Any:
    """A JSON value of a config default (label maps keyed by text, sub-configs dropped)."""
    return json.loads(json.dumps(value, default=lambda _: None))


def _schema(config: Any) -> dict[str, Any]:
    fields = config.to_dict()
    subs = getattr(config, "sub_configs", {}) or {}
    return {"defaults": {key: _plain(value) for key, value in sorted(fields.items())
                         if key not in subs},
            "aliases": dict(sorted(type(config).attribute_map.items())),
            "sub_configs": {name: _schema(getattr(config, name)) for name in sorted(subs)}}


def schema() -> dict[str, Any]:
    """{"transformers": version, "models": {model_type: schema}} from transformers itself."""
    from transformers import AutoConfig

    return {"transformers": metadata.version("transformers"),
            "models": {kind: _schema(AutoConfig.for_model(kind)) for kind in HF_TASKS}}


def main() -> None:
    FIELDS_FILE.write_text(json.dumps(schema(), indent=1, sort_keys=True) + "\n",
                           encoding="utf-8")
    print(f"wrote {FIELDS_FILE}")


if __name__ == "__main__":
    main()
