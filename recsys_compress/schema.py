"""The base of every config schema: a pydantic model whose failures are ``ConfigError``s naming
the full key and what is allowed, and the helpers that parse and describe schemas.

Each config group's schema lives beside the code it configures (``compression/config.py``,
``alignment/config.py``, ...); the run-level schemas, validation of a whole composed config and
Hydra's registration of the groups' defaults are the tasks' (``tasks/config.py``). This module
imports nothing of the project, so every one of them can build on it.
"""

from __future__ import annotations

import typing
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


S = typing.TypeVar("S", bound="Schema")


class Schema(BaseModel):
    """A config group: unknown keys and wrong types fail (strict: no "3" for 3), then ``check``.

    ``KEY`` is where the group sits in the composed config; messages name keys under it.
    """
    model_config = ConfigDict(extra="forbid", strict=True)
    KEY: ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:  # built in Python (scripts, tests): the same errors
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _config_error(type(self), e, self.KEY) from None

    def replace(self: S, **changes: Any) -> S:
        """A validated copy with ``changes`` (``dataclasses.replace`` for schemas)."""
        return type(self)(**{**self.model_dump(), **changes})

    def check(self, p: str) -> None:
        """Range and cross-field rules; raise ``ConfigError`` naming ``p.KEY``."""

    @model_validator(mode="after")
    def _rules(self) -> Schema:
        self.check(self.KEY)
        return self


_TYPE_MESSAGES = {
    "float_type": "must be a number", "int_type": "must be an integer", "bool_type": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list", "model_type": "must be a mapping",
    "dict_type": "must be a mapping", "int_from_float": "must be an integer",
}


def _schema_in(annotation: Any) -> type[Schema] | None:
    candidates = (annotation, *typing.get_args(annotation))
    return next((a for a in candidates if isinstance(a, type) and issubclass(a, Schema)), None)


def _field_path(cls: type[Schema], loc: tuple[Any, ...]) -> tuple[list[str], type[Schema] | None]:
    """The key path of a pydantic error location and the schema that holds its last key.
    Inside a field that is not a schema, string parts are union-member tags ("int",
    "literal['all']"), not keys."""
    path: list[str] = []
    owner, current = cls, cls
    for part in loc:
        if isinstance(part, int):
            path[-1] += f"[{part}]"
        elif current is not None:
            owner = current
            path.append(str(part))
            field = current.model_fields.get(str(part))
            current = _schema_in(field.annotation) if field is not None else None
    return path, owner


def _config_error(cls: type[Schema], error: ValidationError, prefix: str) -> ConfigError:
    """The first problem of ``error`` as a ConfigError with the full key and what is allowed."""
    errors = error.errors()
    for e in errors:  # a rule of ``check``: its message is already complete
        original = (e.get("ctx") or {}).get("error")
        if isinstance(original, ConfigError):
            return original
    first = errors[0]
    path, owner = _field_path(cls, first["loc"])
    key = ".".join(p for p in (prefix, *path) if p)
    same = [e for e in errors if _field_path(cls, e["loc"])[0] == path]  # union members of one field
    value = first.get("input")
    field = owner.model_fields.get(path[-1]) if owner is not None and path else None
    if first["type"] == "extra_forbidden":
        parent = key.rpartition(".")[0] or "the top level"
        allowed = ", ".join(owner.model_fields) if owner is not None else ""
        return ConfigError(f"unknown key {key}; allowed keys in {parent}: {allowed}")
    if first["type"] == "missing":
        if field is not None and _schema_in(field.annotation) is not None:
            return ConfigError(f"missing config group '{key}' (choose one with {key}=NAME)")
        return ConfigError(f"missing required key {key}")
    nullable = field is not None and type(None) in typing.get_args(field.annotation)
    parts = []
    for e in same:
        if e["type"] == "literal_error":
            allowed = ("null, " if nullable else "") + e["ctx"]["expected"].replace("' or '", "', '").replace("'", "")
            parts.append(("is not allowed; allowed: " if len(same) == 1 else "allowed: ") + allowed)
        else:
            parts.append(_TYPE_MESSAGES.get(e["type"], e["msg"].lower()))
    return ConfigError(f"{key}={value!r} " + parts[0] if len(parts) == 1 else f"{key}={value!r}: " + "; ".join(parts))


def parse(cls: type[S], mapping: dict[str, Any]) -> S:
    """``cls`` from plain data; raises ``ConfigError`` naming the offending key."""
    try:
        return cls.model_validate(mapping)
    except ValidationError as e:
        raise _config_error(cls, e, cls.KEY) from None


def defaults_of(cls: type[Schema]) -> dict[str, Any]:
    """The fields of ``cls`` that have defaults, as plain data (what its ``base`` option holds)."""
    out = {}
    for name, f in cls.model_fields.items():
        if f.is_required():
            continue
        value = f.get_default(call_default_factory=True)
        out[name] = defaults_of(type(value)) if isinstance(value, Schema) else value
    return out


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range; allowed: {allowed}")
