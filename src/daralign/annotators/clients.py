"""Judge backends: one small interface over an in-process transformers model, any
OpenAI-compatible HTTP server, and an in-process llama.cpp model (``llama_cpp_client.py``).

A backend answers ``Request``s (chat messages, maybe an assistant prefix to continue from) with
``Reply``s. When a request lists ``candidates`` (e.g. "Yes"/"No", "1".."9", "A"/"B") the backend
returns the probability of each candidate being the *next token*: reading the judge's
distribution is far more informative than parsing the one token it would have sampled (small
judges' parsed scores collapse to a constant). Backends that cannot expose log-probabilities
return ``probs=None`` and the judge parses ``text`` instead.

Secrets: the OpenAI backend reads its API key from the environment variable the config names,
keeps it only inside the httpx client's headers, and scrubs it from every error message.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from daralign.core.errors import AnnotationError, ConfigError
from daralign.annotators.backends import BACKENDS, is_int, is_number, need, register_backend  # noqa: F401  (BACKENDS re-exported)
from daralign.core.rng import fork_rng

OnReply = Callable[[int, "Reply"], None]
Reserve = Callable[[], bool]  # asked before every request (and every retry) is sent: may it go? (annotators/base.py Meter)


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Request:
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...)
    prefix: str = ""  # assistant text already written; the reply continues it
    candidates: tuple[str, ...] = ()  # labels whose next-token probability is wanted
    max_tokens: int = 1
    temperature: float = 0.0
    seed: int | None = None

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class Reply:
    text: str | None  # generated text (may be just the first token)
    probs: dict[str, float] | None  # candidate -> P(next token); None: backend gave no log-probs
    tokens: int = 0  # prompt + completion tokens billed
    latency_s: float = 0.0
    cached: bool = False
    completion_tokens: int = 0  # of ``tokens``, those the judge wrote (priced apart by hosted APIs)


class RateLimit:
    """A hosted API's limits, ``requests_per_minute`` and ``tokens_per_minute``, met by spreading
    requests evenly (no bursts to be refused with 429s): a request starts no sooner than 60/rpm s
    after the previous one, and each token it is booked for holds the next one back 60/tpm s.
    ``wait(tokens)`` blocks until the next request may go and books it; ``settle`` corrects the
    booking with the tokens actually billed."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.request_gap = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.token_gap = 60.0 / tokens_per_minute if tokens_per_minute else 0.0
        self.clock, self.sleep = clock, sleep
        self.next_request = self.next_token = float("-inf")  # earliest start of the next request, by each limit
        self._lock = threading.Lock()

    def wait(self, tokens: int) -> int:
        with self._lock:
            start = max(self.clock(), self.next_request, self.next_token)
            self.next_request = start + self.request_gap
            self.next_token = start + tokens * self.token_gap
        delay = start - self.clock()
        if delay > 0:
            self.sleep(delay)
        return tokens

    def settle(self, booked: int, billed: int) -> None:
        with self._lock:
            self.next_token += (billed - booked) * self.token_gap


def _variants(label: str) -> set[str]:
    """Spellings of a label a judge may emit as one token ("Yes", " yes", "YES")."""
    forms = {label, label.lower(), label.upper(), label.capitalize()}
    return forms | {" " + f for f in forms}


def match_top_logprobs(top: dict[str, float], candidates: tuple[str, ...]) -> dict[str, float]:
    """Sum the probability of every listed token that is a spelling of each candidate.
    ``top`` maps token text -> log-probability (what OpenAI-style servers return)."""
    out = {}
    for c in candidates:
        forms = {f.strip() for f in _variants(c)}
        out[c] = sum(math.exp(lp) for tok, lp in top.items() if tok.strip() in forms and math.isfinite(lp))
    return out


class Client:
    """Backend interface. ``complete`` answers requests in order, calling ``on_reply(i, reply)``
    as each finishes (from the calling thread), so callers can persist partial progress. Before
    sending each request — and each retry of it — a backend calls ``reserve()``; when that says
    no, the request is not sent and its reply is ``None`` (the budget is spent).

    A new backend is a subclass registered with ``@register_backend("name")`` and built by
    ``from_config(judge_config)`` (docs/architecture.md). What it brings lives on it:

    - ``Config``: a dataclass of its own keys (``metadata={"help": ...}`` on each field), written
      at the top level of the judge's flat YAML mapping beside the judge's own keys, and checked by
      its ``__post_init__``. The judge config reads them as attributes (``judge_config.base_url``).
      Every field decides which judges share one loaded backend; a field with
      ``metadata={"in_cache_key": True}`` changes the answer, so it is part of the cache key.
    - its capabilities, asked by the judge's label reading and by the budget's cost model.
    """

    @dataclass
    class Config:
        """A backend without keys of its own."""

    supports_logprobs: ClassVar[bool] = True  # gives the candidates' next-token probabilities (else text is parsed)
    may_omit_logprobs: ClassVar[bool] = False  # may answer without them though asked (a server we do not run)

    @classmethod
    def supports_prefix(cls, config) -> bool:
        """Whether it continues an assistant prefix for this judge config: "10" on a 1-10 scale is
        read as P("1") · P("0" | "1"), one more request per leading digit."""
        return True

    @classmethod
    def from_config(cls, config) -> "Client":
        raise NotImplementedError

    def complete(self, requests: list[Request], on_reply: OnReply | None = None,
                 reserve: Reserve = _always) -> list[Reply | None]:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# transformers (in-process)


MIN_SHARED_PREFIX = 16  # tokens; below this a prefix pass costs more than it saves


def _common_prefix_length(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving at least one token of each row to run."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    for i in range(max(n, 0)):
        if any(r[i] != first[i] for r in rows):
            return i
    return max(n, 0)




@register_backend("transformers")
class TransformersClient(Client):
    """Batched, left-padded forward passes of a local causal LM.

    Speed on CPU: bf16 weights where the CPU has bf16 units (``dtype: auto``), ``logits_to_keep=1`` (only the last position's logits), and a
    pre-hook that makes ``lm_head``'s input contiguous — without it bf16 matmul on the strided
    last-position slice copies the output weights per sequence (1.3 s vs 0.25 s per response).
    """

    @dataclass
    class Config:
        dtype: str = field(default="auto", metadata={
            "help": "auto (bf16 only where the hardware has it) | float32 | bfloat16 | float16"})
        device: str = field(default="auto", metadata={"help": "auto (cuda if available) | cpu | cuda | cuda:N"})
        batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
        reuse_prefix: bool = field(default=True, metadata={
            "help": "compute the requests' shared template prefix once per batch (KV cache); same labels to 1e-4"})
        trust_remote_code: bool = field(default=False, metadata={"help": "let the judge's repo run its own code"})

        def __post_init__(self):
            need(self, "dtype", self.dtype in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
                 "must be auto, float32, bfloat16 or float16")
            need(self, "device", isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device),
                 "must be auto, cpu, cuda or cuda:N")
            need(self, "batch_size", is_int(self.batch_size, 1), "must be an integer >= 1")
            need(self, "trust_remote_code", isinstance(self.trust_remote_code, bool), "must be true or false")
            need(self, "reuse_prefix", isinstance(self.reuse_prefix, bool), "must be true or false")

    def __init__(self, model: str, dtype: str = "auto", batch_size: int = 8, trust_remote_code: bool = False,
                 device: str = "auto", reuse_prefix: bool = True):
        import torch

        from daralign.core.models import load_causal_lm, load_tokenizer, resolve_dtype

        self.torch = torch
        self.name = model
        self.batch_size = batch_size
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.model = load_causal_lm(model, dtype=self.dtype, trust_remote_code=trust_remote_code).eval().to(self.device)
        head = self.model.get_output_embeddings()
        self._hook = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
        self._ids: dict[str, list[int]] = {}
        self.reuse_prefix = reuse_prefix
        self._prefix = None  # (token ids, KV cache) of the last shared request prefix

    @classmethod
    def from_config(cls, c) -> "TransformersClient":
        return cls(c.model, c.dtype, c.batch_size, c.trust_remote_code, c.device, c.reuse_prefix)

    def __repr__(self) -> str:
        return f"TransformersClient(model={self.name!r}, dtype={self.dtype!r}, device={self.device!r})"

    def _token_ids(self, label: str) -> list[int]:
        """Ids of the single-token spellings of ``label`` (multi-token spellings are skipped)."""
        if label not in self._ids:
            ids = set()
            for form in _variants(label):
                enc = self.tokenizer.encode(form, add_special_tokens=False)
                if len(enc) == 1:
                    ids.add(enc[0])
            self._ids[label] = sorted(ids)
        return self._ids[label]

    def render(self, req: Request) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(req.message_dicts(), tokenize=False, add_generation_prompt=True)
        else:  # base models: plain transcript
            text = "".join(f"{r.capitalize()}: {c}\n\n" for r, c in req.messages) + "Assistant:"
        return text + req.prefix

    def complete(self, requests: list[Request], on_reply: OnReply | None = None,
                 reserve: Reserve = _always) -> list[Reply | None]:
        torch = self.torch
        texts = [self.render(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(texts[i]))  # less padding per batch
        replies: list[Reply | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = [i for i in order[start : start + self.batch_size] if reserve()]  # the rest: not sent
            # Group identical decoding settings so one batch is one call.
            groups: dict[tuple, list[int]] = {}
            for i in idx:
                r = requests[i]
                groups.setdefault((r.max_tokens, r.temperature, r.seed, bool(r.candidates)), []).append(i)
            for (max_tokens, temperature, seed, _), group in groups.items():
                t0 = time.perf_counter()
                enc = self.tokenizer([texts[i] for i in group], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                n_prompt = enc["attention_mask"].sum(-1).tolist()
                with torch.inference_mode():
                    probs_rows = self._next_token_probs(enc) if any(requests[i].candidates for i in group) else None
                    gen = self._generate(enc, max_tokens, temperature, seed) if max_tokens > 1 or probs_rows is None else None
                latency = (time.perf_counter() - t0) / len(group)
                for j, i in enumerate(group):
                    req = requests[i]
                    probs = text = None
                    n_new = 1
                    if probs_rows is not None:
                        p = probs_rows[j]
                        probs = {c: float(sum(p[t] for t in self._token_ids(c))) for c in req.candidates}
                        text = self.tokenizer.decode([int(p.argmax())])
                    if gen is not None:
                        text, n_new = gen[j]
                    replies[i] = Reply(text=text, probs=probs, tokens=int(n_prompt[j]) + n_new, latency_s=latency,
                                       completion_tokens=n_new)
                    if on_reply:
                        on_reply(i, replies[i])
        return replies

    def _next_token_probs(self, enc):
        torch = self.torch
        mask = enc["attention_mask"]
        rows = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], mask)]
        shared = _common_prefix_length(rows)
        if self.reuse_prefix and shared >= MIN_SHARED_PREFIX:
            return self._next_token_probs_after_prefix(rows, shared)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        logits = self.model(**enc, position_ids=position_ids, logits_to_keep=1).logits[:, -1]
        return torch.softmax(logits.float(), dim=-1)

    def _next_token_probs_after_prefix(self, rows: list[list[int]], shared: int):
        """Every judge request starts with the same template text: its KV cache is computed once
        (and kept for the next batch) and expanded over the batch; only the differing suffixes —
        left-padded *after* the prefix, masked, positions continuing from it — go through the
        model. Same next-token distribution as the full forward (test: to 1e-4)."""
        import copy

        torch = self.torch
        prefix = tuple(rows[0][:shared])
        if self._prefix is None or self._prefix[0] != prefix:
            ids = torch.tensor([prefix], device=self.device)
            self._prefix = (prefix, self.model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values)
        cache = copy.deepcopy(self._prefix[1])
        cache.batch_repeat_interleave(len(rows))
        suffixes = [r[shared:] for r in rows]
        width = max(len(x) for x in suffixes)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in suffixes], device=self.device)
        suffix_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in suffixes], device=self.device)
        mask = torch.cat([torch.ones((len(rows), shared), dtype=torch.long, device=self.device), suffix_mask], 1)
        position_ids = shared + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        return torch.softmax(logits.float(), dim=-1)

    def _generate(self, enc, max_tokens: int, temperature: float, seed: int | None):
        kw = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        # Sampled retries are seeded, inside fork_rng so the training loop's RNG stream is untouched.
        with fork_rng():
            if seed is not None:
                self.torch.manual_seed(seed)
            out = self.model.generate(**enc, max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id, **kw)
        new = out[:, enc["input_ids"].shape[1] :]
        res = []
        for row in new:
            ids = [int(t) for t in row if int(t) != self.tokenizer.pad_token_id]
            res.append((self.tokenizer.decode(ids, skip_special_tokens=True), len(ids)))
        return res

    def close(self) -> None:
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
            self._hook = None
        self.model = None


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP server (vLLM, llama.cpp server, `transformers serve`, hosted APIs)


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


# ---------------------------------------------------------------------------------------------
# llama.cpp (in-process GGUF, optional dependency)
