"""The OpenAI-compatible HTTP judge backend (``backend: openai``): vLLM, the llama.cpp server,
`transformers serve`, hosted APIs. Retries with backoff, a concurrency limit, the provider's rate
limits (``clients.RateLimit``) and a request reserved against the budget before every attempt.
Same ``Client`` interface as the others (``clients.py``).

Secrets: it reads its API key from the environment variable the config names, keeps it only inside
the httpx client's headers, and scrubs it from every error message."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from daralign.annotators.backends import is_int, is_number, need, register_backend
from daralign.annotators.clients import Client, OnReply, RateLimit, Reply, Request, Reserve, _always, match_top_logprobs
from daralign.core.errors import AnnotationError, ConfigError


class _NotReserved(Exception):
    """The budget says no: this attempt is not sent."""


class _Retryable(Exception):
    """A response worth retrying (5xx, 429, unreadable body)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@functools.cache
def _tls_context():
    """One TLS context for every client: httpx loads the CA bundle anew for each (21 ms on a 2-core
    AMD EPYC). Built on first use, so SSL_CERT_FILE / SSL_CERT_DIR set before then count."""
    import httpx

    return httpx.create_ssl_context()


@register_backend("openai")
class OpenAIClient(Client):
    """``/v1/chat/completions`` (default) or ``/v1/completions`` with retries and a concurrency
    limit. ``top_logprobs`` asks the server for the first token's distribution; servers that do
    not send it fall back to text parsing in the judge."""

    @dataclass
    class Config:
        base_url: str | None = field(default=None, metadata={"help": "the server, e.g. http://127.0.0.1:8080/v1 (required)"})
        api_key_env: str | None = field(default=None, metadata={
            "help": "NAME of the env var holding the key (the key itself never goes in a config)"})
        endpoint: str = field(default="chat", metadata={
            "help": "chat | completions (continues an assistant prefix: two-digit scales read from log-probs)",
            "in_cache_key": True})
        tokenizer: str | None = field(default=None, metadata={
            "help": "completions: where the chat template comes from", "in_cache_key": True})
        top_logprobs: int = field(default=20, metadata={"help": "how many alternatives the server returns", "in_cache_key": True})
        max_concurrency: int = field(default=8, metadata={"help": "requests in flight"})
        timeout_s: float = field(default=60.0, metadata={"help": "per request"})
        max_retries: int = field(default=4, metadata={"help": "retries on connection errors, timeouts, 5xx, 429"})
        backoff_s: float = field(default=0.5, metadata={"help": "first retry delay (exponential with jitter)"})
        requests_per_minute: float | None = field(default=None, metadata={
            "help": "the provider's request limit (requests are spread evenly to it)"})
        tokens_per_minute: float | None = field(default=None, metadata={"help": "the provider's token limit"})

        def __post_init__(self):
            need(self, "base_url", isinstance(self.base_url, str) and self.base_url.startswith(("http://", "https://")),
                 "backend 'openai' needs an http(s) URL such as http://127.0.0.1:8080/v1")
            key_env = self.api_key_env
            need(self, "api_key_env", key_env is None or (isinstance(key_env, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env)),
                 "must be the NAME of an environment variable (the key itself never goes in a config)")
            need(self, "endpoint", self.endpoint in ("chat", "completions"), "must be 'chat' or 'completions'")
            need(self, "tokenizer", self.tokenizer is None or isinstance(self.tokenizer, str), "must be a string")
            for name in ("max_concurrency", "top_logprobs"):
                need(self, name, is_int(getattr(self, name), 1), "must be an integer >= 1")
            need(self, "max_retries", is_int(self.max_retries, 0), "must be an integer >= 0")
            for name in ("timeout_s", "backoff_s"):
                need(self, name, is_number(getattr(self, name)), "must be a finite number >= 0")
            need(self, "timeout_s", self.timeout_s > 0, "must be > 0")
            for name in ("requests_per_minute", "tokens_per_minute"):
                v = getattr(self, name)
                need(self, name, v is None or (is_number(v) and v > 0), "must be a number > 0")

    may_omit_logprobs = True  # a server may not send them: on "auto", a two-digit scale is parsed from text

    @classmethod
    def supports_prefix(cls, config) -> bool:
        return config.endpoint == "completions"  # the chat endpoint always starts a new assistant message

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        endpoint: str = "chat",
        timeout_s: float = 60.0,
        max_retries: int = 4,
        max_concurrency: int = 8,
        top_logprobs: int = 20,
        backoff_s: float = 0.5,
        tokenizer: str | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
    ):
        import httpx

        if endpoint not in ("chat", "completions"):
            raise ConfigError(f"endpoint: {endpoint!r} is not 'chat' or 'completions'")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.endpoint = endpoint
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.top_logprobs = top_logprobs
        self.backoff_s = backoff_s
        self.limit = RateLimit(requests_per_minute, tokens_per_minute) if (requests_per_minute or tokens_per_minute) else None
        headers = {"Content-Type": "application/json"}
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(f"api_key_env: environment variable {api_key_env!r} is not set or empty")
            headers["Authorization"] = f"Bearer {key}"
        self._scrub = (lambda s: s.replace(key, "***")) if key else (lambda s: s)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s), headers=headers, verify=_tls_context())
        self._httpx = httpx
        self._tokenizer = None
        if endpoint == "completions" and tokenizer:
            from daralign.core.models import load_tokenizer

            self._tokenizer = load_tokenizer(tokenizer)

    @classmethod
    def from_config(cls, c) -> "OpenAIClient":
        return cls(c.base_url, c.model, c.api_key_env, c.endpoint, c.timeout_s, c.max_retries, c.max_concurrency,
                   c.top_logprobs, c.backoff_s, c.tokenizer, c.requests_per_minute, c.tokens_per_minute)

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"OpenAIClient(base_url={self.base_url!r}, model={self.model!r}, endpoint={self.endpoint!r})"

    # -- one HTTP call ------------------------------------------------------------------------
    def _payload(self, req: Request) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": req.max_tokens, "temperature": req.temperature}
        if req.seed is not None:
            body["seed"] = req.seed
        if self.endpoint == "chat":
            body["messages"] = req.message_dicts()
            if req.candidates:
                body.update(logprobs=True, top_logprobs=self.top_logprobs)
            return "/chat/completions", body
        if self._tokenizer is not None:
            prompt = self._tokenizer.apply_chat_template(req.message_dicts(), tokenize=False, add_generation_prompt=True)
        else:
            prompt = "".join(f"{r.capitalize()}: {c}\n\n" for r, c in req.messages) + "Assistant:"
        body["prompt"] = prompt + req.prefix
        if req.candidates:
            body["logprobs"] = self.top_logprobs
        return "/completions", body

    def _post(self, req: Request, reserve: Reserve) -> Reply:
        path, body = self._payload(req)
        if not reserve():  # every attempt is a paid request: none is sent past the budget
            raise _NotReserved
        # the provider's limits: about 4 characters a token for the booking, corrected by the usage it bills
        booking = self.limit.wait(len(str(body)) // 4 + req.max_tokens) if self.limit else None
        t0 = time.perf_counter()
        resp = self._http.post(self.base_url + path, json=body)
        if resp.status_code == 429 or resp.status_code >= 500:
            ra = resp.headers.get("retry-after")
            try:
                retry_after = float(ra) if ra else None
            except ValueError:
                retry_after = None
            raise _Retryable(f"HTTP {resp.status_code}: {resp.text[:200]!r}", retry_after)
        if resp.status_code >= 400:  # a client error will not fix itself: fail now
            raise AnnotationError(self._scrub(f"judge server {self.base_url}{path} answered HTTP {resp.status_code}: {resp.text[:300]!r}"))
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.endpoint == "chat" else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"unreadable response body {resp.text[:200]!r}") from None
        top = _top_logprobs(choice.get("logprobs"))
        probs = match_top_logprobs(top, req.candidates) if (req.candidates and top is not None) else None
        usage = data.get("usage") or {}
        tokens = int(usage.get("total_tokens") or (usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)))
        if booking is not None and tokens:
            self.limit.settle(booking, tokens)  # booked an estimate: hold the next request back by what was billed
        return Reply(text=text or "", probs=probs, tokens=tokens, latency_s=time.perf_counter() - t0,
                     completion_tokens=int(usage.get("completion_tokens") or 0))

    def _post_with_retries(self, req: Request, reserve: Reserve) -> Reply | None:
        from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt

        httpx = self._httpx

        def wait(state):  # exponential backoff with jitter; honour Retry-After (capped) on 429/503
            expo = min(30.0, self.backoff_s * 2 ** (state.attempt_number - 1)) + random.uniform(0, self.backoff_s)
            ra = getattr(state.outcome.exception(), "retry_after", None)
            return max(expo, min(ra, 30.0)) if ra else expo

        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, (_Retryable, httpx.TransportError))),
        )
        try:
            return retrying(self._post, req, reserve)
        except _NotReserved:
            return None
        except RetryError as e:
            last = e.last_attempt.exception()
            kind = type(last).__name__ if isinstance(last, httpx.TransportError) else "server error"
            raise AnnotationError(
                self._scrub(
                    f"judge server {self.base_url} failed after {self.max_retries + 1} attempts "
                    f"({kind}: {str(last)[:300]}); check that it is running and reachable, or raise max_retries/timeout_s"
                )
            ) from None

    def complete(self, requests: list[Request], on_reply: OnReply | None = None,
                 reserve: Reserve = _always) -> list[Reply | None]:
        replies: list[Reply | None] = [None] * len(requests)
        with cf.ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = {pool.submit(self._post_with_retries, r, reserve): i for i, r in enumerate(requests)}
            try:
                for fut in cf.as_completed(futures):
                    i = futures[fut]
                    replies[i] = fut.result()
                    if on_reply and replies[i] is not None:
                        on_reply(i, replies[i])
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return replies

    def close(self) -> None:
        self._http.close()


def _top_logprobs(lp: Any) -> dict[str, float] | None:
    """First generated token's top log-probs as {token: logprob}, from either the chat format
    (``content[0].top_logprobs``: list of {token, logprob}) or the legacy completions format
    (``top_logprobs[0]``: {token: logprob})."""
    if not isinstance(lp, dict):
        return None
    try:
        if lp.get("content"):
            first = lp["content"][0]
            out = {t["token"]: float(t["logprob"]) for t in first.get("top_logprobs") or []}
            out.setdefault(first["token"], float(first["logprob"]))
            return out
        if lp.get("top_logprobs"):
            return {k: float(v) for k, v in lp["top_logprobs"][0].items()}
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return None
