"""Reading the YAML a user wrote: safe, and a key given twice is an error, not a silent
overwrite (PyYAML keeps the last value)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from simulator.errors import UserError


class DuplicateKey(yaml.MarkedYAMLError):
    """A mapping names the same key twice."""


#: libyaml's parser where PyYAML was built with it (10× faster than the pure-Python one).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class UniqueKeyLoader(_SAFE_LOADER):  # type: ignore[misc,valid-type]
    """SafeLoader that refuses duplicate mapping keys (merge keys `<<` still work)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it below
                    continue
                if first is not None:
                    raise DuplicateKey(
                        None, None,
                        f"key '{key}' appears twice (first on line {first.start_mark.line + 1});"
                        " expected each key once", key_node.start_mark)
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


@contextmanager
def yaml_errors(shown: str) -> Iterator[None]:
    """Turn any YAML problem inside the block into one UserError naming `shown`."""
    try:
        yield
    except yaml.MarkedYAMLError as exc:
        raise UserError(*describe(exc, shown)) from None
    except yaml.YAMLError as exc:
        raise UserError(shown, f"YAML error: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise UserError(shown, "YAML nested too deeply") from None


def load_yaml(text: str, shown: str) -> Any:
    """Parse `text` (named `shown` in errors); one-line UserError on any problem."""
    with yaml_errors(shown):
        return yaml.load(text, Loader=UniqueKeyLoader)


def describe(exc: yaml.MarkedYAMLError, shown: str) -> tuple[str, str]:
    """(where with line, message) of a YAML error."""
    mark = exc.problem_mark or exc.context_mark
    line = f":{mark.line + 1}" if mark else ""
    problem = exc.problem or exc.context or "invalid YAML"
    if isinstance(exc, DuplicateKey):
        return f"{shown}{line}", problem
    return f"{shown}{line}", f"YAML syntax error: {problem}"
