"""Turn parsed YAML into frozen dataclasses: `${VAR}` interpolation, type conversion, strict keys.

Kept generic so the config schema is just the dataclasses in `gateway.config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

# Deeper than any config or directory needs; a parser's recursion never gets near it.
MAX_YAML_DEPTH = 64

_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$")
# Settings that switch a check off when empty: an empty value here is refused, never "unset".
SECURITY_FIELDS = frozenset(
    {
        "auth.secret",
        "auth.secret_file",
        "auth.public_key_file",
        "auth.issuer",
        "auth.audience",
        "metrics.bearer_token",
    }
)


class ConfigError(Exception):
    """A config problem, said in one line: `field: what is wrong`."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class YamlFileError(Exception):
    """A YAML file that cannot be read as data, said in one line naming it and where."""


def read_yaml_file(path: Path) -> Any:
    """The file's YAML, parsed safely. YamlFileError for bytes that are not UTF-8, nesting
    deeper than MAX_YAML_DEPTH or invalid YAML, each with the line and column; OSError as
    the file system raises it."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise YamlFileError(
            f"{path} is not UTF-8: byte 0x{data[exc.start]:02x} at line {line}, column {column}"
        ) from None
    try:
        # The event stream comes from a loop, not recursion: depth is measured before the
        # constructor, which recurses, ever sees the nesting.
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                mark = event.start_mark
                if depth > MAX_YAML_DEPTH and mark is not None:
                    raise YamlFileError(
                        f"{path} is nested too deeply (over {MAX_YAML_DEPTH} levels) at line "
                        f"{mark.line + 1}, column {mark.column + 1}"
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise YamlFileError(f"{path} is not valid YAML{where}") from None


class _FromEnvironment(str):
    """A string that went through interpolation: it may be converted to the field's type."""

    __slots__ = ()


def interpolate(value: Any, environ: Mapping[str, str], where: str = "") -> Any:
    """Expand `${VAR}`, `${VAR:-default}` and `$$` in every string, after YAML parsing.
    `${VAR:-default}` takes the default when VAR is unset or empty, as a shell does."""
    if isinstance(value, dict):
        return {k: interpolate(v, environ, _join(where, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, environ, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def expand(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(0) == "$":
            # Not $$ nor a well-formed ${NAME} / ${NAME:-default}: never literal text (a
            # missing brace once made the signing key the config's own words).
            raise ConfigError(where, "a $ that starts no ${VAR} or ${VAR:-default} (write $$)")
        name, default = match.group(1), match.group(2)
        if default is not None:
            # as a shell's `:-`: unset or empty both take the default (`PORT=` in a .env
            # file or an empty CI variable means "not given", not "the empty string")
            return environ.get(name) or default
        if name in environ:
            return environ[name]
        raise ConfigError(where, f"environment variable {name} is not set and has no default")

    return _FromEnvironment(_REFERENCE.sub(expand, value))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def build(cls: type[T], data: Any, base_dir: Path, where: str = "") -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where, f"expected a mapping, got {_describe(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(_join(where, unknown[0]), "unknown key")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        path = _join(where, name)
        if name in data:
            values[name] = _convert(hints[name], data[name], base_dir, path)
        elif dataclasses.is_dataclass(hints[name]):
            # Build nested sections from nothing so their defaults resolve like given values.
            values[name] = build(hints[name], {}, base_dir, path)
        elif isinstance(f.default, Path):
            values[name] = _convert(Path, str(f.default), base_dir, path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(path, "required value is missing")
    return cls(**values)


def _convert(tp: Any, value: Any, base_dir: Path, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        empty = value is None or (isinstance(value, _FromEnvironment) and value == "")
        if empty and where in SECURITY_FIELDS and value is not None:
            raise ConfigError(where, "is empty: an empty value would switch this check off")
        if empty and type(None) in get_args(tp):
            return None
        if len(options) == 1:
            return _convert(options[0], value, base_dir, where)
        raise ConfigError(where, "unsupported union type in schema")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            choices = " | ".join(map(str, allowed))
            raise ConfigError(where, f"must be one of {choices}, got {_describe(value)}")
        return str(value)
    if origin in (tuple, list):
        if isinstance(value, _FromEnvironment):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(where, f"expected a list, got {_describe(value)}")
        (item_type, *_) = get_args(tp)
        items = [_convert(item_type, v, base_dir, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return build(tp, value, base_dir, where)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, _FromEnvironment) and value.lower() in _BOOLEANS:
            return _BOOLEANS[value.lower()]
        raise ConfigError(where, f"expected true or false, got {_describe(value)}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(where, f"expected a number, got {_describe(value)}")
        number: Any = None
        if isinstance(value, int | float) and (tp is float or isinstance(value, int)):
            number = tp(value)
        elif isinstance(value, _FromEnvironment):
            with contextlib.suppress(ValueError):
                number = tp(value)
        if number is not None:
            if tp is float and not math.isfinite(number):
                # no setting here means anything as NaN or infinity (a timeout that never fires)
                raise ConfigError(where, f"must be a finite number, got {number}")
            return number
        kind = "an integer" if tp is int else "a number"
        raise ConfigError(where, f"expected {kind}, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            if not value and where in SECURITY_FIELDS:
                raise ConfigError(where, "is empty: an empty value would switch this check off")
            return str(value)
        raise ConfigError(where, f"expected a string, got {_describe(value)}")
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(where, f"expected a path, got {_describe(value)}")
        path = Path(str(value)).expanduser()
        # Relative paths resolve against the config file's folder, not the working directory.
        return path if path.is_absolute() else (base_dir / path)
    raise ConfigError(where, f"unsupported type {tp!r} in schema")


_BOOLEANS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    return f"{type(value).__name__} {value!r}"[:60]


__all__ = ["ConfigError", "build", "interpolate"]
