"""The LLM judge annotator: pointwise scores (DAR's reward) and pairwise preferences (OAIF's).

How a label is read:
- Score, ``scale: yes_no``: P(Yes) / (P(Yes) + P(No)) from the judge's next-token distribution.
- Score, numeric ``scale: "1-10"`` (or a custom ``{label: value}`` mapping): the expected value
  over the scale's labels, renormalised over their probability mass. Two-digit values ("10")
  need a second step, P("1") * P("0" | "1"), which backends that can continue an assistant
  prefix answer (transformers, llama_cpp, openai ``endpoint: completions``); on the chat
  endpoint such scales are parsed from text instead.
- Compare: P("A") / (P("A") + P("B")); with ``debias: both_orders`` both orders are asked and
  averaged, and ``judge/position_flip_rate`` reports how often they disagree.
- Without log-probabilities the judge's text is parsed; an unreadable answer, or too little
  probability on the scale's labels (``min_label_mass``), is *invalid*: ``None`` in the result,
  counted in ``judge/invalid_rate``, then dropped, retried (sampled text) or raised per
  ``invalid_policy``. A number is never made up.

Injection safety: prompts and responses are pasted inside tags (<conversation>, <response>, ...)
whose look-alikes in the pasted text are escaped, and only the judge's *output* is parsed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from daralign.annotators.base import Annotator, CompareResult, ScoreResult, register_annotator
from daralign.annotators.cache import ResponseCache, cache_key
from daralign.annotators import llama_cpp_client  # noqa: F401  (registers backend llama_cpp; imports llama_cpp only when used)
from daralign.annotators.backends import BACKENDS, acquire_client, release_client
from daralign.annotators.clients import Client, Reply, Request
from daralign.annotators.judge_text import (  # noqa: F401  (re-exported: the judge's public text helpers)
    Scale, fit_prompt, format_prompt, load_template, neutralise, parse_label, parse_scale, render, template_names,
)
from daralign.core.errors import AnnotationError, ConfigError

MODES = ("score", "compare")
POLICIES = ("retry", "drop", "fail")
DEBIAS = ("both_orders", "none")


@dataclass
class JudgeConfig:
    """Every key of a ``type: judge`` annotator config (unknown keys are an error)."""

    type: str = "judge"
    mode: str = "score"  # score | compare: what the run asks of it by default (every judge does both)
    template: str = "helpfulness"  # a name in templates/ or a path to a .txt file
    scale: Any = "yes_no"  # yes_no | "LO-HI" (e.g. "1-10") | {label: value}
    backend: str = "transformers"  # transformers | openai | llama_cpp
    model: str = "bundled:qwen2.5-coder-0.5b-instruct"
    dtype: str = "auto"  # transformers: auto (bf16 only where the hardware has it) | float32 | bfloat16 | float16
    device: str = "auto"  # transformers: auto (cuda if available) | cpu | cuda | cuda:N
    batch_size: int = 8  # transformers: sequences per forward pass
    reuse_prefix: bool = True  # transformers: compute the requests' shared template prefix once per batch (KV cache)
    max_concurrency: int = 8  # openai: requests in flight
    requests_per_minute: float | None = None  # openai: the provider's request limit (requests are spread to it)
    tokens_per_minute: float | None = None  # openai: the provider's token limit
    price_per_1k_input_tokens: float | None = None  # reported as judge/cost (with the output price)
    price_per_1k_output_tokens: float | None = None
    timeout_s: float = 60.0  # openai: per request
    max_retries: int = 4  # openai: retries on connection errors, timeouts, 5xx, 429
    backoff_s: float = 0.5  # openai: first retry delay (exponential with jitter)
    invalid_policy: str = "drop"  # retry | drop | fail
    invalid_retries: int = 2  # retry: extra sampled attempts per invalid label
    cache: str | None = None  # sqlite file; repeated requests are free
    debias: str = "both_orders"  # compare: both_orders | none
    base_url: str | None = None  # openai: e.g. http://127.0.0.1:8080/v1
    api_key_env: str | None = None  # openai: NAME of the env var holding the key
    endpoint: str = "chat"  # openai: chat | completions
    tokenizer: str | None = None  # openai completions: where the chat template comes from
    use_logprobs: Any = "auto"  # auto | true | false
    top_logprobs: int = 20  # openai: how many alternatives the server returns
    max_new_tokens: int = 8  # text answers (no log-probs, retries)
    temperature: float = 0.0  # first attempt; retries sample at retry_temperature
    retry_temperature: float = 0.7
    min_label_mass: float = 1e-3  # below this P(labels) the answer is invalid
    system_prompt: str | None = None
    max_prompt_chars: int = 8000  # the pasted prompt is cut from the left beyond this (the response is always whole)
    trust_remote_code: bool = False
    n_ctx: int = 4096  # llama_cpp
    n_threads: int | None = None  # llama_cpp

    def __post_init__(self):
        def need(cond, name, msg):
            if not cond:
                raise ConfigError(f"judge config field {name!r}: {msg} (got {getattr(self, name)!r})")

        need(self.type == "judge", "type", "must be 'judge'")
        need(self.mode in MODES, "mode", f"must be one of {MODES}")
        need(self.backend in BACKENDS, "backend", f"must be one of {tuple(BACKENDS)}")
        need(self.invalid_policy in POLICIES, "invalid_policy", f"must be one of {POLICIES}")
        need(self.debias in DEBIAS, "debias", f"must be one of {DEBIAS}")
        need(self.endpoint in ("chat", "completions"), "endpoint", "must be 'chat' or 'completions'")
        need(isinstance(self.model, str) and self.model, "model", "must be a non-empty string")
        need(self.dtype in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"), "dtype",
             "must be auto, float32, bfloat16 or float16")
        need(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device), "device",
             "must be auto, cpu, cuda or cuda:N")
        for name in ("batch_size", "max_concurrency", "max_new_tokens", "top_logprobs", "n_ctx", "max_prompt_chars"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "must be an integer >= 1")
        for name in ("max_retries", "invalid_retries"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "must be an integer >= 0")
        for name in ("timeout_s", "backoff_s", "temperature", "retry_temperature", "min_label_mass"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, name,
                 "must be a finite number >= 0")
        need(self.timeout_s > 0, "timeout_s", "must be > 0")
        for name in ("requests_per_minute", "tokens_per_minute", "price_per_1k_input_tokens", "price_per_1k_output_tokens"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                               and (v > 0 or name.startswith("price"))), name, "must be a number > 0 (prices ≥ 0)")
        need(self.min_label_mass < 1, "min_label_mass", "must be < 1")
        need(self.use_logprobs in ("auto", True, False), "use_logprobs", "must be auto, true or false")
        for name in ("cache", "system_prompt", "tokenizer"):
            need(getattr(self, name) is None or isinstance(getattr(self, name), str), name, "must be a string")
        need(isinstance(self.trust_remote_code, bool), "trust_remote_code", "must be true or false")
        need(isinstance(self.reuse_prefix, bool), "reuse_prefix", "must be true or false")
        need(self.n_threads is None or (isinstance(self.n_threads, int) and self.n_threads >= 1), "n_threads",
             "must be an integer >= 1")
        if self.backend == "openai":
            need(isinstance(self.base_url, str) and self.base_url.startswith(("http://", "https://")), "base_url",
                 "backend 'openai' needs an http(s) URL such as http://127.0.0.1:8080/v1")
        need(self.api_key_env is None or (isinstance(self.api_key_env, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env)),
             "api_key_env", "must be the NAME of an environment variable (the key itself never goes in a config)")


# ---------------------------------------------------------------------------------------------
# the annotator


@dataclass
class _Ask:
    """One request to the judge, with what makes it unique for the cache."""

    request: Request
    responses: tuple[str, ...]  # one: a score ask; two: a comparison
    prompt: str
    reply: Reply | None = None

    @property
    def mode(self) -> str:
        return _mode(self.responses)


def _mode(responses: tuple[str, ...]) -> str:
    return "score" if len(responses) == 1 else "compare"


@register_annotator("judge")
class JudgeAnnotator(Annotator):
    """LLM judge. ``score`` returns one reward per response; ``compare`` returns P(a better) —
    one object does both, whatever ``mode`` the config names (it is the default the run asks for).
    Every request (each order, second digit, retry, HTTP attempt) is reserved on the meter first.

    ``metrics`` of each result: judge/requests, judge/cache_hits, judge/latency_s (mean over
    paid requests), judge/tokens, judge/invalid_rate and, for compare, judge/position_flip_rate.
    ``totals`` accumulates the same counts over the annotator's life.
    """

    meters_items = False  # every backend request is reserved as it is sent (``_run``)

    def __init__(self, config: JudgeConfig, client: Client | None = None):
        super().__init__()
        self.config = config
        self.scale = parse_scale(config.scale)
        self._templates = {config.mode: load_template(config.template, config.mode)}
        self._client = client  # given: its maker closes it; else a shared one, acquired on first use
        self._client_key: tuple | None = None
        self._cache = ResponseCache(config.cache) if config.cache else None
        self.last_answers: list[str | None] = []
        self._said_no_logprobs = False
        self.totals: dict[str, float] = {"labels": 0, "invalid": 0, "requests": 0, "cache_hits": 0, "tokens": 0, "latency_s": 0.0}

    @classmethod
    def from_config(cls, cfg: dict) -> "JudgeAnnotator":
        if not isinstance(cfg, dict):
            raise ConfigError(f"judge config must be a mapping, got {type(cfg).__name__}")
        known = {f.name for f in fields(JudgeConfig)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"judge config: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
        return cls(JudgeConfig(**cfg))

    def __repr__(self) -> str:
        c = self.config
        return f"JudgeAnnotator(mode={c.mode!r}, template={c.template!r}, backend={c.backend!r}, model={c.model!r})"

    @property
    def client(self) -> Client:
        """The backend, loaded on first use (seconds) and shared by every judge on the same one."""
        if self._client is None:
            self._client_key, self._client = acquire_client(self.config)
        return self._client

    def template(self, mode: str) -> str:
        if mode not in self._templates:
            self._templates[mode] = load_template(self.config.template, mode)
        return self._templates[mode]

    def single_order(self) -> "JudgeAnnotator":
        """This judge comparing in the order given only (no both-orders debiasing): for evaluations
        that swap orders themselves so each order's verdict stays visible. Same backend, cache and meter."""
        if self.config.debias == "none":
            return self
        twin = JudgeAnnotator(replace(self.config, debias="none", cache=None))  # the same shared backend, loaded when used
        twin._cache = self._cache
        return twin.use_meter(self.meter)

    # -- requests, cache, metrics ------------------------------------------------------------
    @classmethod
    def cost_per_label(cls, cfg: dict, kind: str) -> int:
        """A compare label asked in both orders is 2 requests; a two-digit score read from
        log-probs adds one second-digit request per leading digit ("1" of "10")."""
        c = JudgeConfig(**cfg)
        if kind == "compare":
            return 2 if c.debias == "both_orders" else 1
        scale = parse_scale(c.scale)
        if scale.multi_digit and _reads_probs(c, scale, supports_logprobs=True,
                                              supports_prefix=c.backend != "openai" or c.endpoint == "completions"):
            return 1 + len({lab[0] for lab in scale.labels if len(lab) > 1})
        return 1

    def _use_probs(self) -> bool:
        return _reads_probs(self.config, self.scale, self.client.supports_logprobs, self.client.supports_prefix)

    def _request(self, prompt: str, responses: tuple[str, ...], *, probs: bool, prefix: str = "",
                 candidates: tuple[str, ...] = (), attempt: int = 0) -> _Ask:
        c = self.config
        if _mode(responses) == "score":
            values = {"response": neutralise(responses[0])}
        else:
            values = {"response_a": neutralise(responses[0]), "response_b": neutralise(responses[1])}
        text = render(self.template(_mode(responses)), prompt=neutralise(prompt), answer_format=self.scale.answer_format, **values)
        msgs = ((("system", c.system_prompt),) if c.system_prompt else ()) + (("user", text),)
        sampled = attempt > 0
        req = Request(
            messages=msgs,
            prefix=prefix,
            candidates=candidates if probs else (),
            max_tokens=1 if probs else c.max_new_tokens,
            temperature=c.retry_temperature if sampled else c.temperature,
            seed=attempt if sampled else None,
        )
        return _Ask(req, responses, prompt)

    def _key(self, ask: _Ask) -> str:
        c, r = self.config, ask.request
        return cache_key(
            template=self.template(ask.mode), backend=c.backend, model=c.model, prompt=ask.prompt, responses=ask.responses,
            scale=self.scale.spec(), system=c.system_prompt, endpoint=c.endpoint if c.backend == "openai" else None,
            decoding={"prefix": r.prefix, "candidates": r.candidates, "max_tokens": r.max_tokens,
                      "temperature": r.temperature, "seed": r.seed, "top_logprobs": c.top_logprobs},
        )

    def _run(self, asks: list[_Ask], stats: dict) -> None:
        """Fill ``ask.reply`` for every ask: cached ones for free, the rest from the backend
        (each reply is cached the moment it arrives, so an interrupted run keeps its progress)."""
        todo, keys = [], {}
        for a in asks:
            if self._cache is not None:
                keys[id(a)] = k = self._key(a)
                hit = self._cache.get(k)
                if hit is not None:
                    a.reply = Reply(text=hit["text"], probs=hit["probs"], tokens=0, latency_s=0.0, cached=True)
                    stats["cache_hits"] += 1
                    self.meter.cache_hit()
                    continue
            todo.append(a)
        if not todo:
            return

        def on_reply(i: int, reply: Reply) -> None:
            a = todo[i]
            a.reply = reply
            self.last_answers = (self.last_answers + [reply.text])[-3:]  # for "what did it answer?" errors
            stats["tokens"] += reply.tokens
            stats["completion_tokens"] += reply.completion_tokens
            if reply.probs is None and a.request.candidates and not self._said_no_logprobs:
                self._said_no_logprobs = True  # once: labels are then parsed from text (0 or 1 on a yes/no scale)
                from daralign.core.tracking import console

                console.print(f"[yellow]judge: {self.config.backend} backend {self.config.base_url or self.config.model} "
                              f"returned no log-probabilities; labels are parsed from its text (a yes/no scale gives "
                              f"only 0 or 1; `judge/prob_label_frac` shows the share read from probabilities)[/yellow]")
            stats["latency_s"] += reply.latency_s
            stats["paid"] += 1
            if self._cache is not None:
                self._cache.put(keys[id(a)], {"text": reply.text, "probs": reply.probs, "tokens": reply.tokens})

        before = self.meter.requests[self.meter.phase]
        try:
            self.client.complete([a.request for a in todo], on_reply, reserve=self.meter.reserve_one)
        finally:  # what was reserved was (or may have been) sent: paid for, even when the call fails
            stats["requests"] += self.meter.requests[self.meter.phase] - before
        stats["budget_cut"] += sum(a.reply is None for a in todo)  # not sent: their labels stay invalid

    def _label_value(self, asks: list[_Ask], stats: dict) -> list[float | None]:
        """Value of each first-step ask on the scale (score) or P("A") (compare); None if invalid.
        Numeric two-digit scales get their second step here."""
        mode = asks[0].mode if asks else "score"
        labels = ("A", "B") if mode == "compare" else self.scale.labels
        values = (1.0, 0.0) if mode == "compare" else self.scale.values
        out: list[float | None] = []
        two_step = mode == "score" and self.scale.multi_digit
        seconds: dict[tuple[int, str], _Ask] = {}
        if two_step:
            prefixes = sorted({lab[0] for lab in labels if len(lab) > 1})
            digits = tuple(str(d) for d in range(10))
            for i, a in enumerate(asks):
                if a.reply is not None and a.reply.probs is not None:
                    for d in prefixes:
                        seconds[(i, d)] = self._request(a.prompt, a.responses, probs=True, prefix=d, candidates=digits)
            self._run(list(seconds.values()), stats)
        for i, a in enumerate(asks):
            r = a.reply
            if r is None:
                out.append(None)
            elif r.probs is None:
                if self.config.use_logprobs is True and a.request.candidates:
                    raise AnnotationError("judge: the backend returned no log-probabilities; set use_logprobs: false or auto")
                lab = parse_label(r.text, labels)
                out.append(values[labels.index(lab)] if lab is not None else None)
                stats["labels_read"] += lab is not None
            else:
                p = {lab: float(r.probs.get(lab[0] if two_step else lab, 0.0)) for lab in labels}
                if two_step:
                    for lab in labels:
                        if len(lab) > 1:
                            second = seconds[(i, lab[0])].reply
                            p[lab] = p[lab] * float(second.probs.get(lab[1], 0.0)) if second and second.probs else float("nan")
                    for d in {lab[0] for lab in labels if len(lab) > 1}:
                        if d in labels:  # "1" alone = P("1") * P(no second digit of the scale)
                            second = seconds[(i, d)].reply
                            cont = sum(float(second.probs.get(lab[1], 0.0)) for lab in labels if len(lab) > 1 and lab[0] == d) \
                                if second and second.probs else float("nan")
                            p[d] = p[d] * max(0.0, 1.0 - cont)
                mass = sum(p.values())
                if not math.isfinite(mass) or mass <= 0 or mass < self.config.min_label_mass:
                    out.append(None)
                else:
                    v = sum(p[lab] * val for lab, val in zip(labels, values)) / mass
                    out.append(v if math.isfinite(v) else None)
                    stats["labels_read"] += out[-1] is not None
                    stats["prob_labels"] += out[-1] is not None
        return out

    def _labels(self, prompt_texts: list[str], groups: list[tuple[str, ...]], stats: dict) -> list[float | None]:
        """One value per (prompt, responses) group, applying the invalid policy."""
        c = self.config
        probs = self._use_probs()
        cands = ("A", "B") if _mode(groups[0] if groups else ("",)) == "compare" else (
            tuple(sorted({lab[0] for lab in self.scale.labels})) if self.scale.multi_digit else self.scale.labels)
        asks = [self._request(p, g, probs=probs, candidates=cands) for p, g in zip(prompt_texts, groups)]
        self._run(asks, stats)
        vals = self._label_value(asks, stats)
        if c.invalid_policy == "retry":
            for attempt in range(1, c.invalid_retries + 1):
                bad = [i for i, v in enumerate(vals) if v is None]
                if not bad:
                    break
                again = [self._request(prompt_texts[i], groups[i], probs=False, attempt=attempt) for i in bad]
                self._run(again, stats)
                for i, v in zip(bad, self._label_value(again, stats)):
                    vals[i] = v
        if c.invalid_policy == "fail" and any(v is None for v in vals):
            i = next(i for i, v in enumerate(vals) if v is None)
            a = asks[i].reply
            said = (a.text if a else None) or ""
            raise AnnotationError(
                f"judge: unreadable answer for item {i} ({said[:80]!r}); invalid_policy is 'fail' "
                "(use 'retry' or 'drop' to continue without it)"
            )
        return vals

    def _metrics(self, stats: dict, n_labels: int, n_invalid: int) -> dict[str, float]:
        for k in ("requests", "cache_hits", "tokens", "latency_s"):
            self.totals[k] += stats[k]
        self.totals["labels"] += n_labels
        self.totals["invalid"] += n_invalid
        self.totals["paid"] = self.totals.get("paid", 0) + stats["paid"]
        cost = self._cost(stats)
        return ({"judge/cost": cost} if cost is not None else {}) | {
            "judge/prob_label_frac": stats["prob_labels"] / stats["labels_read"] if stats["labels_read"] else 0.0,
            "judge/requests": float(stats["requests"]),  # sent to the backend (cache hits are not)
            "judge/cache_hits": float(stats["cache_hits"]),
            "judge/budget_cut": float(stats["budget_cut"]),
            "judge/latency_s": stats["latency_s"] / stats["paid"] if stats["paid"] else 0.0,
            "judge/tokens": float(stats["tokens"]),
            "judge/invalid_rate": n_invalid / n_labels if n_labels else 0.0,
        }

    def _cost(self, stats: dict) -> float | None:
        """What the paid requests cost at the configured prices per 1k input / output tokens (None: no price)."""
        c = self.config
        if c.price_per_1k_input_tokens is None and c.price_per_1k_output_tokens is None:
            return None
        out_tokens = stats["completion_tokens"]
        return ((stats["tokens"] - out_tokens) * (c.price_per_1k_input_tokens or 0.0)
                + out_tokens * (c.price_per_1k_output_tokens or 0.0)) / 1000.0

    def _prompt_texts(self, prompts: list[Any], n: int) -> tuple[list[str], int]:
        """Prompts as pasted text, cut from the left to ``max_prompt_chars`` (said once per call)."""
        fitted = [fit_prompt(format_prompt(p), self.config.max_prompt_chars) for p in self._expand(prompts, n, "prompts")]
        cut = sum(c for _, c in fitted)
        if cut:
            from daralign.core.tracking import console

            console.print(f"[yellow]judge: {cut} prompt(s) longer than max_prompt_chars={self.config.max_prompt_chars} "
                          f"cut from the left (the response is always whole)[/yellow]")
        return [t for t, _ in fitted], cut

    @staticmethod
    def _expand(items: list, n: int, what: str) -> list:
        """Prompts/rows may be given once per prompt for K completions each (prompt-major)."""
        if len(items) == n:
            return list(items)
        if items and n % len(items) == 0:
            k = n // len(items)
            return [x for x in items for _ in range(k)]
        raise AnnotationError(f"judge: {len(items)} {what} for {n} completions")

    def write(self, requests: list[Request]) -> list[Reply]:
        """Free-text answers to ready-made requests (MT-bench grading), each request metered."""
        replies = self.client.complete(requests, reserve=self.meter.reserve_one)
        return [r if r is not None else Reply(text=None, probs=None) for r in replies]

    # -- what the base's metered score/compare call ---------------------------------------------
    def _score(self, prompts: list[Any], completions: list[str], rows: list[dict]) -> ScoreResult:
        stats = _new_stats()
        texts, cut = self._prompt_texts(prompts, len(completions))
        vals = self._labels(texts, [(str(c),) for c in completions], stats)
        n_invalid = sum(v is None for v in vals)
        return ScoreResult(scores=vals, metrics=self._metrics(stats, len(vals), n_invalid) | {"judge/truncated_prompts": float(cut)})

    def _compare(self, prompts: list[Any], completions_a: list[str], completions_b: list[str],
                 rows: list[dict]) -> CompareResult:
        stats = _new_stats()
        texts, cut = self._prompt_texts(prompts, len(completions_a))
        ab = [(str(a), str(b)) for a, b in zip(completions_a, completions_b)]
        first = self._labels(texts, ab, stats)
        flips = n_both = 0
        if self.config.debias == "both_orders":
            second = self._labels(texts, [(b, a) for a, b in ab], stats)  # P("A") here = P(b better)
            probs: list[float | None] = []
            for p1, p2 in zip(first, second):
                if p1 is None or p2 is None:
                    probs.append(None)
                    continue
                q = 1.0 - p2
                n_both += 1
                flips += (p1 > 0.5) != (q > 0.5)
                probs.append(0.5 * (p1 + q))
        else:
            probs = first
        n_invalid = sum(p is None for p in probs)
        metrics = self._metrics(stats, len(probs), n_invalid) | {"judge/truncated_prompts": float(cut)}
        if self.config.debias == "both_orders":
            metrics["judge/position_flip_rate"] = flips / n_both if n_both else 0.0
        return CompareResult(prob_a=probs, metrics=metrics)

    def close(self) -> None:
        if self._client_key is not None:
            release_client(self._client_key)
            self._client_key = None
        self._client = None
        if self._cache is not None:
            self._cache.close()
            self._cache = None


def _reads_probs(c: JudgeConfig, scale: Scale, supports_logprobs: bool, supports_prefix: bool) -> bool:
    """Whether labels are read from next-token probabilities (else parsed from text)."""
    if c.use_logprobs is False or not supports_logprobs:
        return False
    if scale.multi_digit and (not supports_prefix or (c.backend == "openai" and c.use_logprobs == "auto")):
        # "10" needs P("0" | "1"): chat endpoints cannot continue a prefix, and a server that
        # may not return log-probs would leave a one-token answer that cannot tell 1 from 10.
        return False
    return True


def text_judge(cfg: dict, where: str) -> JudgeAnnotator:
    """A judge used for the text it writes (MT-bench's FastChat prompts), or one clear line."""
    if not isinstance(cfg, dict) or cfg.get("type") != "judge":
        raise ConfigError(f"{where}: needs an LLM judge that writes text (type: judge)")
    return JudgeAnnotator.from_config({**cfg, "template": "helpfulness"})  # its own templates are not used


def _new_stats() -> dict:
    return {"requests": 0, "cache_hits": 0, "tokens": 0, "completion_tokens": 0, "latency_s": 0.0, "paid": 0,
            "budget_cut": 0, "prob_labels": 0, "labels_read": 0}
