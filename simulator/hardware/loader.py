"""Find, read and validate a hardware YAML file, with errors that name file, line and field."""

from __future__ import annotations

import difflib
import json
import types
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from simulator.errors import UserError
from simulator.hardware.schema import Hardware
from simulator.yamlfile import UniqueKeyLoader, yaml_errors

#: Largest hardware file we read; a machine description is a few KiB.
MAX_FILE_BYTES = 1 << 20
#: Largest number of YAML nodes after alias expansion (guards against "billion laughs").
MAX_NODES = 100_000


def shipped() -> list[str]:
    """File names of the chip descriptions shipped with the package."""
    return [name for name, system in _shipped_files() if not system]


def shipped_systems() -> list[str]:
    """File names of the system descriptions (devices and links) shipped with the package."""
    return [name for name, system in _shipped_files() if system]


def _shipped_files() -> list[tuple[str, bool]]:
    """(file name, whether it is a system: it has a top-level `devices:` key)."""
    folder = resources.files("hwconfigs")
    return sorted((p.name, any(line.startswith("devices:") for line in
                               p.read_text(encoding="utf-8").splitlines()))
                  for p in folder.iterdir() if p.name.endswith(".yaml"))


def locate(name: str | Path) -> tuple[str, str]:
    """Return (display name, text) of a hardware file given by path or shipped bare name."""
    path = Path(name)
    if path.is_file():
        return str(path), _read(path, str(path))
    if path.name == str(name):
        candidates = [str(name), f"{name}.yaml"]
        folder = resources.files("hwconfigs")
        for candidate in candidates:
            entry = folder.joinpath(candidate)
            if entry.is_file():
                return candidate, _decode(entry.read_bytes(), candidate)
    if path.exists():
        raise UserError(str(name), "is not a regular file; expected a hardware YAML file")
    near = _nearest_shipped(str(name)) if path.name == str(name) else None
    hint = f"did you mean {near}? " if near else ""
    raise UserError(
        "--hw", f"no hardware file '{name}'; {hint}expected a path or one of: "
                f"{', '.join(shipped() + shipped_systems())}")


def _nearest_shipped(name: str) -> str | None:
    """The shipped file whose name is closest to `name` (with or without .yaml), if any."""
    files = {file.removesuffix(".yaml"): file for file in shipped() + shipped_systems()}
    near = difflib.get_close_matches(name.removesuffix(".yaml"), list(files), n=1)
    return files[near[0]] if near else None


def _read(path: Path, shown: str) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UserError(shown, f"is {size} bytes; a hardware file is at most {MAX_FILE_BYTES}")
        return _decode(path.read_bytes(), shown)
    except OSError as exc:
        raise UserError(shown, f"cannot be read ({exc.strerror})") from None


def _decode(data: bytes, shown: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(shown, f"byte {exc.start} is not valid UTF-8; expected a UTF-8 "
                               "YAML text") from None


def parse_yaml(text: str, shown: str) -> tuple[Any, yaml.Node | None]:
    """Safe-load `text`, returning the data and its node tree (for line numbers)."""
    with yaml_errors(shown):
        loader = UniqueKeyLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _count_nodes(node, MAX_NODES) > MAX_NODES:
                raise UserError(shown, f"expands to more than {MAX_NODES} YAML nodes "
                                       "(aliases nested too deep)")
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    return data, node


def _count_nodes(root: yaml.Node, limit: int) -> int:
    """Count nodes as if aliases were expanded, stopping once past `limit`."""
    count, stack = 0, [root]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return count


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any], flag: str) -> None:
    """Set dotted paths in `data` in place: {'clock': '54 MHz', 'cores.count': 8}; a
    number picks a list item ('links.0.efficiency': the first link level's)."""
    for path, value in overrides.items():
        keys = path.split(".")
        if not all(keys):
            raise UserError(f"{flag} {path}", "expected a dotted path such as 'cores.count'")
        target: Any = data
        for depth, key in enumerate(keys[:-1]):
            where = ".".join(keys[: depth + 1])
            if isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            elif isinstance(target, dict) and key in target:
                target = target[key]
            else:
                raise UserError(f"{flag} {path}", f"'{where}' is not a section of the file")
        if not isinstance(target, dict):
            raise UserError(f"{flag} {path}", f"'{'.'.join(keys[:-1])}' is not a section")
        target[keys[-1]] = value


def _line_of(node: yaml.Node | None, loc: Iterable[Any]) -> int | None:
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(key)), None)
            if match is None:
                match = next((k for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            match = node.value[key]
        else:
            match = None
        if match is None:
            break
        node = match
        line = node.start_mark.line + 1
    return line


def _unwrap(annotation: Any) -> list[Any]:
    """The types an annotation allows: Annotated and unions (X | None) taken apart."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [inner for arg in get_args(annotation) for inner in _unwrap(arg)]
    return [annotation]


def _step(annotation: Any, part: Any) -> list[Any]:
    """The annotations one location part further in: a model's field, a dict's value, a
    list's or tuple's item."""
    found: list[Any] = []
    for kind in _unwrap(annotation):
        origin = get_origin(kind)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            field = kind.model_fields.get(str(part))
            found += [field.annotation] if field is not None else []
        elif origin is dict and len(get_args(kind)) == 2:
            found.append(get_args(kind)[1])
        elif origin in (list, tuple) and isinstance(part, int):
            found += [arg for arg in get_args(kind) if arg is not Ellipsis]
    return found


def _known_keys(loc: Iterable[Any], root: type[BaseModel]) -> list[str]:
    """Field names of the section that holds the key at `loc` (its last part)."""
    annotations: list[Any] = [root]
    for part in list(loc)[:-1]:
        annotations = [inner for annotation in annotations for inner in _step(annotation, part)]
    return sorted({name for annotation in annotations for kind in _unwrap(annotation)
                   if isinstance(kind, type) and issubclass(kind, BaseModel)
                   for name in kind.model_fields})


def _unknown_key(loc: list[Any], root: type[BaseModel]) -> str:
    """'unknown key' with the nearest field of its section (a key's first word counts too:
    'bandwith' finds bandwidth_per_channel)."""
    keys = _known_keys(loc, root)
    names = {key.split("_")[0]: key for key in keys} | {key: key for key in keys}
    near = difflib.get_close_matches(str(loc[-1]), list(names), n=1) if loc else []
    if near:
        return f"unknown key; did you mean {names[near[0]]}?"
    if keys:
        return f"unknown key; expected one of {', '.join(keys)}"
    return "unknown key (check its spelling against `simulate schema`)"


def _describe(error: dict[str, Any], loc: list[Any], root: type[BaseModel]) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return _unknown_key(loc, root)
    if kind == "missing":
        return "required field is missing"
    return message.removeprefix("Value error, ")


def validate(data: Any, shown: str, node: yaml.Node | None = None) -> Hardware:
    """Validate parsed YAML into a Hardware, raising one UserError for the first problem."""
    if not isinstance(data, dict):
        raise UserError(shown, "expected a YAML mapping of hardware sections at top level")
    from simulator.hardware.system import is_system

    if is_system(data):
        raise UserError(shown, "is a system of several devices; expected one chip here "
                               "(a system runs models, with --tp/--pp, and collectives: "
                               "simulate op allreduce --hw SYSTEM)")
    try:
        return Hardware.model_validate(data).read_from(shown)
    except ValidationError as exc:
        raise describe_error(exc, shown, node, Hardware) from None


def describe_error(exc: ValidationError, shown: str, node: yaml.Node | None,
                   root: type[BaseModel]) -> UserError:
    """The one-line error for the first problem pydantic found in a `root` file."""
    # an unknown key first: a misspelt key also makes its real name look missing
    error = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    loc = [part for part in error["loc"] if not str(part).startswith("function-")]
    field = ".".join(str(part) for part in loc) or "(top level)"
    line = _line_of(node, loc)
    where = f"{shown}:{line}" if line else shown
    return UserError(f"{where}: {field}", _describe(error, loc, root))


def load_hardware(name: str | Path, overrides: Mapping[str, Any] | None = None) -> Hardware:
    """Load a hardware description by path or shipped name, applying dotted overrides."""
    shown, text = locate(name)
    data, node = parse_yaml(text, shown)
    if overrides:
        if not isinstance(data, dict):
            raise UserError(shown, "expected a YAML mapping of hardware sections at top level")
        apply_overrides(data, overrides, "--hw-set")
    return validate(data, shown, node)


def schema_json() -> str:
    """The JSON Schema of the hardware format."""
    schema = Hardware.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Hardware description (simulate)"
    return json.dumps(schema, indent=2, sort_keys=True)
