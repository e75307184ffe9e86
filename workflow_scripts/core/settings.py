"""Typed stage settings.

A rule hands its stage a validated section of the config as JSON (``--settings``). The stage parses it once,
into a frozen dataclass that names every key the stage reads, so the code says ``settings.seq_in``, a key the
stage does not know or one it needs and did not get stops it before any work with the key's name, and the
record a stage writes is ``settings.record()``, exactly what it ran with.
"""

import dataclasses
import json
import types
import typing

from workflow_scripts.core.errors import InputError


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of the stages' settings: build one with :meth:`parse` (JSON text) or :meth:`of` (a mapping)."""

    @classmethod
    def of(cls, values, where=None):
        where = where or cls.__name__
        if not isinstance(values, dict):
            raise InputError(f"{where}: expected a mapping of settings, got {values!r}")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise InputError(f"{where}: unknown setting(s) {', '.join(unknown)}; this stage reads {', '.join(fields)}")
        missing = [name for name, field in fields.items() if name not in values and not has_default(field)]
        if missing:
            raise InputError(f"{where}: missing setting(s) {', '.join(missing)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: converted(hints[name], value, f"{where}.{name}") for name, value in values.items()})

    @classmethod
    def parse(cls, text):
        """From the JSON text of a ``--settings`` argument."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{cls.__name__}: the settings are not valid JSON: {error}") from None
        return cls.of(values)

    def record(self):
        """The settings as plain JSON values, for the stage's manifest."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def has_default(field):
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def converted(hint, value, where):
    """``value`` as ``hint`` asks: lists made tuples (the settings are frozen)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return converted(inner, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise InputError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    return value
