"""The judge's backends: their registry (``@register_backend("name")`` on a ``Client`` subclass
with ``from_config(judge_config)``; ``backend: name`` builds it), the one-line field check their
``Config`` dataclasses share, and the loaded backends judges share (one loaded model, or one HTTP
client, per backend, model and set of the backend's own fields)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import fields
from typing import Any

from daralign.core.errors import ConfigError
from daralign.core.registry import registrar

BACKENDS: dict[str, type] = {}
register_backend = registrar(BACKENDS, "backend_name")  # ``@register_backend("openai")``: ``backend: openai`` builds it

_SHARED: dict[tuple, list] = {}  # key -> [client, number of judges using it]
_IDLE: dict[tuple, object] = {}  # key -> a loaded client no judge uses, kept by ``keep_loaded`` (oldest first)
_KEEP: list[tuple[int, tuple | None]] = []  # the innermost ``keep_loaded``: (how many idle clients, of which backends)


# -- checking a judge's fields (the judge's own and each backend's ``Config``) --------------------
def need(config: Any, name: str, ok: Any, msg: str) -> None:
    """One ConfigError line naming the judge field ``name`` of ``config`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"judge config field {name!r}: {msg} (got {getattr(config, name)!r})")


def is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def is_number(v: Any, low: float = 0.0) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= low


# -- the loaded backends judges share -----------------------------------------------------------
def client_key(config) -> tuple:
    """What decides whether two judges share one loaded backend: its name, the model and every
    field of the backend's own ``Config`` (a new field counts without being listed anywhere) —
    whatever their template, scale, mode or cache."""
    own = config.backend_config
    return (config.backend, str(config.model), *((f.name, str(getattr(own, f.name))) for f in fields(own)))


def acquire_client(config) -> tuple[tuple, object]:
    """The loaded backend for a judge config (built on first use), shared by every judge whose
    ``client_key`` agrees; (key, client). Each acquire is matched by one ``release_client(key)``."""
    key = client_key(config)
    if key not in _SHARED:
        idle = _IDLE.pop(key, None)
        _SHARED[key] = [idle if idle is not None else BACKENDS[config.backend].from_config(config), 0]
    _SHARED[key][1] += 1
    return key, _SHARED[key][0]


def release_client(key: tuple) -> None:
    entry = _SHARED.get(key)
    if entry is not None:
        entry[1] -= 1
        if entry[1] <= 0:
            del _SHARED[key]
            _IDLE[key] = entry[0]
            _close_idle()


def _close_idle() -> None:
    """Close the idle backends the innermost ``keep_loaded`` does not keep (all, outside any)."""
    keep, backends = _KEEP[-1] if _KEEP else (0, None)
    for key in [k for k in _IDLE if backends is not None and k[0] not in backends]:
        _IDLE.pop(key).close()
    while len(_IDLE) > keep:
        _IDLE.pop(next(iter(_IDLE))).close()


@contextlib.contextmanager
def keep_loaded(max_idle: int = 2, backends: tuple[str, ...] | None = None):
    """Within this block a backend no judge uses any more stays loaded (the ``max_idle`` most
    recently released), so the next judge built the same way takes it instead of loading the model
    again: `train --with_control` judges its control with the run's loaded judge, and a test session
    loads each real judge once. ``backends``: keep only these (default: any). Leaving the block
    closes what it kept."""
    _KEEP.append((max_idle, backends))
    try:
        yield
    finally:
        _KEEP.pop()
        _close_idle()
