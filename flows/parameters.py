"""The flows' typed parameters: a pydantic view of the config dataclasses, for Prefect's parameter schema.

Prefect builds each flow's parameter schema (the form of "Run" in the UI, checked when a run is created) and
validates the values with pydantic before the flow body runs. The configuration itself stays the frozen
dataclasses of gram_core (help text per field, ``from_dict``/``merge``/``describe``, checks in
``__post_init__``); ``ConfigOverrides`` is built from them here, field by field, so the form, ``gram presets
--fields`` and the YAML presets read the same definitions. Every field of the view is optional: only the
fields a user sets override the chosen preset, as ``--set key.path=value`` does on the command line.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any

import pydantic
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from gram_core.config import rename_deprecated
from tasks.settings import (
    DEFAULT_PRESET,
    PipelineConfig,
    parse_overrides,
    parse_value,
    preset_names,
    preset_path,
)

NOT_OVERRIDABLE = ("preset",)  # chosen by the `preset` parameter itself
# --set values that carry a credential (a tracking URI with a password, a store URL with a token): Prefect
# stores a flow's parameters in its database and shows them in the UI, so the CLI passes the redacted text
# and the real value stays here, in this process, for the flow body to read (``overrides_dict``).
_PRIVATE: dict[tuple[str, ...], str] = {}


def _config_class(tp: Any) -> type | None:
    """The config dataclass in ``tp`` (``Cfg`` or ``Cfg | None``), else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return _config_class(inner[0])
    return None


def _nullable(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


class OverridesView(BaseModel):
    """Base of the generated views: unknown keys are errors; ``to_dict`` keeps only what was set."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    __config_class__: typing.ClassVar[type]

    def to_dict(self) -> dict[str, Any]:
        """The fields that were set, as the nested dict ``load_preset`` merges over the preset.

        A null for a field that cannot be null (a form may send empty fields) means "not set".
        """
        hints = typing.get_type_hints(self.__config_class__)
        out: dict[str, Any] = {}
        for name in self.model_fields_set:
            value = getattr(self, name)
            if isinstance(value, OverridesView):
                out[name] = value.to_dict()
            elif value is not None or _nullable(hints[name]):
                out[name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@functools.cache
def overrides_view(cls: type) -> type[OverridesView]:
    """A pydantic model with every field of config dataclass ``cls`` optional (nested configs as views)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in NOT_OVERRIDABLE:
            continue
        nested = _config_class(hints[f.name])
        tp = overrides_view(nested) if nested is not None else hints[f.name]
        fields[f.name] = (tp | None, Field(None, description=f.metadata.get("help")))
    view = pydantic.create_model(f"{cls.__name__}Overrides", __base__=OverridesView,
                                 __doc__=f"{cls.__name__} fields to override (unset: the preset's value).", **fields)
    view.__config_class__ = cls
    return view


def _from_set_strings(value: Any) -> Any:
    """``["finetune.learning_rate=1e-4", ...]`` (the CLI's --set form) -> the nested mapping; deprecated keys of
    renamed fields (e.g. ``drop_blank_rows``) under their new names, with a FutureWarning."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = parse_overrides(value)
    return rename_deprecated(PipelineConfig, value, "overrides") if isinstance(value, dict) else value


def _known_preset(name: str) -> str:
    preset_path(name)  # ConfigError (a ValueError) names the known presets
    return name


ConfigOverrides = Annotated[
    overrides_view(PipelineConfig), BeforeValidator(_from_set_strings),
    Field(description="Config fields to change on top of the preset (only those you set); every field and its "
                      "help: `gram presets --fields`."),
]
Preset = Annotated[
    str, AfterValidator(_known_preset),
    Field(description=f"A preset ({', '.join(preset_names())}) or the path of a YAML config file.",
          json_schema_extra={"examples": preset_names()}),
]


@contextlib.contextmanager
def private_overrides(overrides: list[str] | None) -> Iterator[list[str] | None]:
    """The --set list as Prefect may store it (credentials redacted); inside the block, flows started in this
    process read the real values back (``overrides_dict``)."""
    from tasks.redaction import redact

    if not overrides:
        yield overrides
        return
    public, private = [], {}
    for item in overrides:
        key, sep, value = item.partition("=")
        clean = redact(value)
        if sep and clean != value:
            private[tuple(key.strip().split("."))] = value
        public.append(f"{key}={clean}" if sep else item)
    before = dict(_PRIVATE)
    _PRIVATE.update(private)
    try:
        yield public
    finally:
        _PRIVATE.clear()
        _PRIVATE.update(before)


_PRIVATE_VALUES: dict[str, str] = {}  # redacted flow argument -> the real one, for flows started in this process


@contextlib.contextmanager
def private_values(*values: str | None) -> Iterator[list[str | None]]:
    """``values`` (flow arguments such as ``gram adapt --data URL?token=...``) as Prefect may store them,
    credentials redacted; inside the block, ``reveal`` gives the flow the real ones back."""
    from tasks.redaction import redact

    public = [redact(v) if isinstance(v, str) else v for v in values]
    before = dict(_PRIVATE_VALUES)
    _PRIVATE_VALUES.update({p: v for p, v in zip(public, values, strict=True) if isinstance(v, str) and p != v})
    try:
        yield public
    finally:
        _PRIVATE_VALUES.clear()
        _PRIVATE_VALUES.update(before)


def reveal(value: Any) -> Any:
    """The real value of a flow argument that ``private_values`` redacted (else ``value`` unchanged)."""
    return _PRIVATE_VALUES.get(value, value) if isinstance(value, str) else value


def _restore_private(overrides: dict[str, Any]) -> dict[str, Any]:
    from tasks.redaction import redact

    out = copy.deepcopy(overrides)
    for path, raw in _PRIVATE.items():
        node = out
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(path[-1]) == parse_value(redact(raw)):
            node[path[-1]] = parse_value(raw)
    return out


def overrides_dict(overrides: Any) -> dict[str, Any] | list[str] | None:
    """What ``load_preset`` takes, from a validated view (or a plain mapping / --set list when called directly);
    values redacted by ``private_overrides`` come back as the real ones."""
    plain = overrides.to_dict() if isinstance(overrides, OverridesView) else overrides
    if not _PRIVATE or not plain:
        return plain
    return _restore_private(parse_overrides(plain) if isinstance(plain, (list, tuple)) else plain)


__all__ = ["ConfigOverrides", "DEFAULT_PRESET", "Preset", "overrides_dict", "overrides_view", "private_overrides",
           "private_values", "reveal"]
