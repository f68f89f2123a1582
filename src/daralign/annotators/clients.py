"""The judge backends' one small interface, ``Client``; each backend is a module of its own: an
in-process transformers model (``transformers_client.py``), any OpenAI-compatible HTTP server
(``openai_client.py``) and an in-process llama.cpp model (``llama_cpp_client.py``).

A backend answers ``Request``s (chat messages, maybe an assistant prefix to continue from) with
``Reply``s. When a request lists ``candidates`` (e.g. "Yes"/"No", "1".."9", "A"/"B") the backend
returns the probability of each candidate being the *next token*: reading the judge's
distribution is far more informative than parsing the one token it would have sampled (small
judges' parsed scores collapse to a constant). Backends that cannot expose log-probabilities
return ``probs=None`` and the judge parses ``text`` instead.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, ClassVar

from daralign.annotators.backends import BACKENDS, register_backend  # noqa: F401  (re-exported: a backend's recipe)

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
