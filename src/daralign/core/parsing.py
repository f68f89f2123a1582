"""Reading settings: YAML files and command-line flags checked against dataclass fields.

Values come from the dataclass defaults, then a YAML file (``--config``), then flags
(``--field value``). An unknown key, a wrong type or an impossible value is a ``ConfigError`` that
names the field (and the file): one line, never a usage dump.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from daralign.core.errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a ``ConfigError`` (one clear line from the CLI, exit 1) instead
    of a usage dump and ``SystemExit(2)``."""

    def error(self, message: str):
        raise ConfigError(f"command line: {message}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_bool_or_auto(text: str) -> bool | str:
    return "auto" if text.lower() == "auto" else parse_bool(text)


def base_type(tp):
    """(scalar type, is_list) of a field annotation such as ``int | None`` or ``list[str]``."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"Any": Any})  # annotations are strings under `from __future__`
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return base_type(args[0])
    if origin is list:
        return args[0], True
    return tp, False


def coerce(name: str, value: Any, tp, source: str) -> Any:
    """Check/convert a YAML value against the field's type; errors name the field and file."""
    base, is_list = base_type(tp)
    if value is None or base is Any:
        return value
    if name == "bf16" and str(value).lower() == "auto":  # saved configs record what it resolved to
        from daralign.core.models import resolve_dtype

        return resolve_dtype("auto", "cuda" if _cuda_available() else "cpu") == "bfloat16"
    if is_list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {name} must be a list (got {value!r})")
        return [coerce(name, v, base, source) for v in value]
    if base in (int, float) and isinstance(value, bool):  # YAML `true` is not a number
        raise ConfigError(f"{source}: {name} must be {base.__name__} (got {value!r})")
    try:
        if base is bool and not isinstance(value, bool):
            return parse_bool(str(value))
        if base is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if base is int and (isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str)):
            return int(value)
        if base is str and isinstance(value, (str, int, float)):
            return str(value)
    except (ValueError, argparse.ArgumentTypeError):
        pass
    if isinstance(value, base):
        return value
    raise ConfigError(f"{source}: {name} must be {getattr(base, '__name__', base)} (got {value!r})")


def dataclass_fields(*classes) -> dict[str, tuple[type, Any, dataclasses.Field]]:
    """name → (the class that declares it, its type, the field) over ``classes``. A name two of them
    declare is refused: a method's config field named like a TrainConfig field would otherwise
    silently take its YAML key and flag (a plug-in's programming error, said in one line)."""
    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in out:
                raise ConfigError(f"config field {f.name!r} is declared by both {out[f.name][0].__name__} and "
                                  f"{cls.__name__}; one YAML key and flag cannot set two fields: rename it in {cls.__name__}")
            out[f.name] = (cls, hints[f.name], f)
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # one line: where, then what (PyYAML's own message spans lines)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of field: value")
    return data


def field_help(f: dataclasses.Field) -> str:
    """A field's help with its default (argparse's %(default)s cannot show it: defaults are suppressed
    so that only given flags override the YAML)."""
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    text = f.metadata.get("help", "")
    return (text + f" (default: {default!r})").replace("%", "%%")


def attach_negative_numbers(argv: list[str]) -> list[str]:
    """``--learning_rate -1e-3`` → ``--learning_rate=-1e-3``: argparse takes "-1e-3" for a flag."""
    out = []
    for tok in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and tok.startswith("-") and not tok.startswith("--"):
            try:
                float(tok)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={tok}"
                continue
        out.append(tok)
    return out


def reconcile_parameterisations(cls, sources: list[tuple[str, dict]]) -> dict:
    """Merge config sources (earliest first). ``cls.PARAMETERISATIONS`` lists alternative spellings
    of the same numbers (DAR: α/β or total/ratio). One source giving two spellings that disagree
    is an error naming both; a later source giving one spelling drops the others from earlier
    sources (said in one line), so a sweep over dar_total/dar_ratio means what it says even when
    the base config sets dar_alpha/dar_beta."""
    groups = getattr(cls, "PARAMETERISATIONS", ())
    merged: dict = {}
    for name, values in sources:
        given = [g for g in groups if any(k in values for k in g)]
        if len(given) > 1:
            resolved = [cls(**{k: values[k] for k in g if k in values}) for g in given]
            keys = [k for g in groups for k in g]
            if any(abs(getattr(resolved[0], k) - getattr(r, k)) > 1e-9 * max(1.0, abs(getattr(r, k)))
                   for r in resolved[1:] for k in keys):
                shown = " and ".join("/".join(f"{k}={values[k]}" for k in g if k in values) for g in given)
                raise ConfigError(f"{name}: {shown} are two different settings of the same knobs; give one of them")
        for g in given:
            dropped = sorted(k for other in groups if other is not g for k in other if k in merged)
            if dropped and len(given) == 1:
                from daralign.core.tracking import console

                console.print(f"note: {name} sets {'/'.join(k for k in g if k in values)}, which replaces "
                              f"{'/'.join(dropped)} from an earlier source")
                for k in dropped:
                    merged.pop(k)
        merged.update(values)
    return merged
