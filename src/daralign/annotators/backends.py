"""The judge's backends: their registry (``@register_backend("name")`` on a ``Client`` subclass
with ``from_config(judge_config)``; ``backend: name`` builds it) and the loaded backends judges
share (one loaded model, or one HTTP client, per set of backend fields)."""

from __future__ import annotations

import contextlib

from daralign.core.registry import registrar

BACKENDS: dict[str, type] = {}
register_backend = registrar(BACKENDS, "backend_name")  # ``@register_backend("openai")``: ``backend: openai`` builds it

# The fields a backend is built from: two judges agreeing on all of them are one loaded model (or
# one HTTP client) — whatever their template, scale, mode or cache.
CLIENT_KEYS = ("backend", "model", "dtype", "device", "batch_size", "reuse_prefix", "trust_remote_code", "base_url",
               "api_key_env", "endpoint", "timeout_s", "max_retries", "max_concurrency", "top_logprobs", "backoff_s",
               "tokenizer", "n_ctx", "n_threads", "requests_per_minute", "tokens_per_minute")
_SHARED: dict[tuple, list] = {}  # key -> [client, number of judges using it]
_IDLE: dict[tuple, object] = {}  # key -> a loaded client no judge uses, kept by ``keep_loaded`` (oldest first)
_KEEP: list[tuple[int, tuple | None]] = []  # the innermost ``keep_loaded``: (how many idle clients, of which backends)


def acquire_client(config) -> tuple[tuple, object]:
    """The loaded backend for a judge config (built on first use), shared by every judge whose
    backend fields agree; (key, client). Each acquire is matched by one ``release_client(key)``."""
    key = tuple(str(getattr(config, k)) for k in CLIENT_KEYS)
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
