"""TOML configuration plus CLI flags -> frozen dataclasses.

Precedence, lowest to highest: dataclass defaults < the ``[section]`` of the TOML file given with
``--config`` < flags given on the command line. Only the CLI calls these functions; every library
component receives a ready config object.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration file or a flag holds a value that cannot be used."""


#: the subcommands (``streamrec.cli``) and the file's sections, one per subcommand, named as on the
#: command line (``[build-samples]``; ``[build_samples]`` is read too)
SECTIONS = ("broker", "replay", "tail", "demo", "joiner", "build-samples", "train-offline", "learner", "score")


def load_section(path: str | Path | None, section: str) -> dict[str, Any]:
    """Return the ``[section]`` table of the TOML file at ``path`` ({} when path is None).

    A section the file names that no command reads (a typo such as ``[learnr]``) is an error, as
    an unknown key inside a section is; so is a section given under both spellings.
    """
    if path is None:
        return {}
    p = Path(path)
    try:
        with p.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    unknown = sorted(k for k in doc if k.replace("_", "-") not in SECTIONS)
    if unknown:
        raise ConfigError(f"{str(p)!r}: unknown section(s) {', '.join(f'[{k}]' for k in unknown)}; "
                          f"the sections are {', '.join(f'[{k}]' for k in SECTIONS)}")
    names = [k for k in doc if k.replace("_", "-") == section.replace("_", "-")]
    if len(names) > 1:
        raise ConfigError(f"{str(p)!r} has both [{names[0]}] and [{names[1]}]: keep one")
    table = doc[names[0]] if names else {}
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] in {str(p)!r} must be a table, got {type(table).__name__}")
    return table


def build(cls: type[T], *layers: dict[str, Any] | None) -> T:
    """Instantiate dataclass ``cls`` from layered dicts (later layers win; ``None`` values skipped).

    Nested dataclass fields take nested dicts. Unknown keys are an error, so a typo in a config
    file is reported instead of silently ignored.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is not None:
                merged[key] = value
    return _instantiate(cls, merged, cls.__name__)


def _instantiate(cls: type[T], values: dict[str, Any], where: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _instantiate(hint, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
