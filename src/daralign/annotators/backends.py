"""The judge's backends: their registry (``@register_backend("name")`` on a ``Client`` subclass
with ``from_config(judge_config)``; ``backend: name`` builds it) and the loaded backends judges
share (one loaded model, or one HTTP client, per set of backend fields)."""

from __future__ import annotations

from daralign.core.registry import registrar

BACKENDS: dict[str, type] = {}
register_backend = registrar(BACKENDS, "backend_name")  # ``@register_backend("openai")``: ``backend: openai`` builds it

# The fields a backend is built from: two judges agreeing on all of them are one loaded model (or
# one HTTP client) — whatever their template, scale, mode or cache.
CLIENT_KEYS = ("backend", "model", "dtype", "device", "batch_size", "reuse_prefix", "trust_remote_code", "base_url",
               "api_key_env", "endpoint", "timeout_s", "max_retries", "max_concurrency", "top_logprobs", "backoff_s",
               "tokenizer", "n_ctx", "n_threads", "requests_per_minute", "tokens_per_minute")
_SHARED: dict[tuple, list] = {}  # key -> [client, number of judges using it]


def acquire_client(config) -> tuple[tuple, object]:
    """The loaded backend for a judge config (built on first use), shared by every judge whose
    backend fields agree; (key, client). Each acquire is matched by one ``release_client(key)``."""
    key = tuple(str(getattr(config, k)) for k in CLIENT_KEYS)
    if key not in _SHARED:
        _SHARED[key] = [BACKENDS[config.backend].from_config(config), 0]
    _SHARED[key][1] += 1
    return key, _SHARED[key][0]


def release_client(key: tuple) -> None:
    entry = _SHARED.get(key)
    if entry is not None:
        entry[1] -= 1
        if entry[1] <= 0:
            del _SHARED[key]
            entry[0].close()
