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
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from daralign.annotators.base import Annotator, CompareResult, ScoreResult, register_annotator
from daralign.annotators.cache import ResponseCache, cache_key
from daralign.annotators.backends import BACKENDS, acquire_client, is_int, is_number, need, release_client
from daralign.annotators.clients import Client, Reply, Request
from daralign.annotators.judge_text import (  # noqa: F401  (re-exported: the judge's public text helpers)
    Scale, fit_prompt, format_prompt, load_template, neutralise, parse_label, parse_scale, render, template_names,
)
from daralign.core.errors import AnnotationError, ConfigError

MODES = ("score", "compare")
POLICIES = ("retry", "drop", "fail")
DEBIAS = ("both_orders", "none")


@dataclass(init=False)
class JudgeConfig:
    """The keys of a ``type: judge`` annotator config that every backend shares.

    The backend's own keys (``base_url``, ``n_ctx``, ...: the fields of its ``Client.Config``) sit
    beside them in the same flat mapping: ``JudgeConfig(**mapping)`` reads them into
    ``backend_config``, checked by that ``Config``, and they read back as attributes
    (``config.base_url``). A key no backend knows is an error listing the known ones; a key of
    another backend is ignored, with a note (a mapping written for one backend keeps working when
    ``backend:`` changes)."""

    type: str = field(default="judge", metadata={"help": "always judge"})
    mode: str = field(default="score", metadata={"help": "score | compare: what the run asks of it by default (every judge does both)"})
    template: str = field(default="helpfulness", metadata={"help": "a name in templates/ or a path to a .txt file"})
    scale: Any = field(default="yes_no", metadata={"help": 'yes_no | "LO-HI" (e.g. "1-10") | {label: value}'})
    backend: str = field(default="transformers", metadata={"help": "the registered judge backend that answers (BACKENDS)"})
    model: str = field(default="bundled:qwen2.5-coder-0.5b-instruct", metadata={
        "help": "hub id, folder, .gguf, bundled:NAME, or the server's model name"})
    price_per_1k_input_tokens: float | None = field(default=None, metadata={"help": "reported as judge/cost (with the output price)"})
    price_per_1k_output_tokens: float | None = field(default=None, metadata={"help": "price of 1000 tokens the judge wrote"})
    invalid_policy: str = field(default="drop", metadata={"help": "retry | drop | fail"})
    invalid_retries: int = field(default=2, metadata={"help": "retry: extra sampled attempts per invalid label"})
    cache: str | None = field(default=None, metadata={"help": "sqlite file; repeated requests are free"})
    debias: str = field(default="both_orders", metadata={"help": "compare: both_orders | none"})
    use_logprobs: Any = field(default="auto", metadata={"help": "auto | true | false"})
    max_new_tokens: int = field(default=8, metadata={"help": "text answers (no log-probs, retries)"})
    temperature: float = field(default=0.0, metadata={"help": "first attempt; retries sample at retry_temperature"})
    retry_temperature: float = field(default=0.7, metadata={"help": "sampling temperature of invalid-answer retries"})
    min_label_mass: float = field(default=1e-3, metadata={"help": "below this P(labels) the answer is invalid"})
    system_prompt: str | None = field(default=None, metadata={"help": "an optional system message before the judge prompt"})
    max_prompt_chars: int = field(default=8000, metadata={
        "help": "the pasted prompt is cut from the left beyond this (the response is always whole)"})
    backend_config: Any = field(default=None, metadata={
        "help": "not a key: the backend's own keys, an instance of its Config, read from the flat mapping"})

    def __init__(self, **keys: Any) -> None:
        """``keys``: the flat mapping, the judge's keys and the backend's together (a given
        ``backend_config``, as ``dataclasses.replace`` passes it, is overridden by flat keys)."""
        for f in fields(JudgeConfig):
            setattr(self, f.name, keys.pop(f.name, f.default))
        self._check()
        self.backend_config = self._read_backend_keys(keys)

    def __getattr__(self, name: str) -> Any:
        """The backend's own keys read as the judge's: ``config.base_url``."""
        own = self.__dict__.get("backend_config")
        if own is not None and name in own.__dataclass_fields__:
            return getattr(own, name)
        raise AttributeError(f"judge config has no field {name!r} (backend {self.__dict__.get('backend')!r})")

    def _check(self) -> None:
        need(self, "type", self.type == "judge", "must be 'judge'")
        need(self, "mode", self.mode in MODES, f"must be one of {MODES}")
        need(self, "backend", self.backend in BACKENDS, f"must be one of {tuple(BACKENDS)}")
        need(self, "invalid_policy", self.invalid_policy in POLICIES, f"must be one of {POLICIES}")
        need(self, "debias", self.debias in DEBIAS, f"must be one of {DEBIAS}")
        need(self, "model", isinstance(self.model, str) and self.model, "must be a non-empty string")
        for name in ("max_new_tokens", "max_prompt_chars"):
            need(self, name, is_int(getattr(self, name), 1), "must be an integer >= 1")
        need(self, "invalid_retries", is_int(self.invalid_retries, 0), "must be an integer >= 0")
        for name in ("temperature", "retry_temperature", "min_label_mass"):
            need(self, name, is_number(getattr(self, name)), "must be a finite number >= 0")
        for name in ("price_per_1k_input_tokens", "price_per_1k_output_tokens"):
            need(self, name, getattr(self, name) is None or is_number(getattr(self, name)), "must be a number >= 0")
        need(self, "min_label_mass", self.min_label_mass < 1, "must be < 1")
        need(self, "use_logprobs", self.use_logprobs in ("auto", True, False), "must be auto, true or false")
        for name in ("cache", "system_prompt"):
            need(self, name, getattr(self, name) is None or isinstance(getattr(self, name), str), "must be a string")

    def _read_backend_keys(self, keys: dict[str, Any]) -> Any:
        """The backend's ``Config`` from the keys left once the judge's own are taken."""
        backend = BACKENDS[self.backend]
        own = {f.name for f in fields(backend.Config)}
        mine = {f.name for f in fields(JudgeConfig)}
        if own & mine:  # the judge would take the key, and the backend would never see it
            raise ConfigError(f"judge backend {self.backend!r}: its Config field(s) {', '.join(map(repr, sorted(own & mine)))} "
                              "shadow the judge's own; rename them")
        others = {f.name: name for name, cls in BACKENDS.items() if cls is not backend for f in fields(cls.Config)}
        unknown = sorted(k for k in keys if k not in own and k not in others)
        if unknown:
            known = sorted((mine - {"backend_config"}) | own)
            raise ConfigError(f"judge config: unknown field(s) {', '.join(map(repr, unknown))}; "
                              f"known for backend {self.backend!r}: {', '.join(known)}")
        ignored: dict[str, list[str]] = {}  # another backend -> its keys given here
        for k in sorted(k for k in keys if k not in own):
            ignored.setdefault(others[k], []).append(k)
        if ignored:
            _note_once(f"judge: backend {self.backend!r} ignores the keys of other backends ("
                       + "; ".join(f"{b}: {', '.join(ks)}" for b, ks in ignored.items()) + ")")
        given = self.backend_config
        if given is not None and not is_dataclass(given):
            raise ConfigError("judge config: 'backend_config' is not a key; write the backend's keys at the top level")
        base = {f.name: getattr(given, f.name) for f in fields(given)} if isinstance(given, backend.Config) else {}
        return backend.Config(**(base | {k: v for k, v in keys.items() if k in own}))


_NOTED: set[str] = set()


def _note_once(text: str) -> None:
    if text not in _NOTED:
        _NOTED.add(text)
        from daralign.core.tracking import console

        console.print(f"[yellow]{text}[/yellow]")


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
        return cls(JudgeConfig(**cfg))

    @classmethod
    def describe(cls, cfg: dict) -> str:
        return (f"judge {cfg.get('model', 'bundled:qwen2.5-coder-0.5b-instruct')} via {cfg.get('backend', 'transformers')} "
                f"(template {cfg.get('template', 'helpfulness')!r}, scale {cfg.get('scale', 'yes_no')!r})")

    @classmethod
    def for_method(cls, cfg: dict, kind: str, needs_score: bool, algorithm: str) -> dict:
        """The judge in the mode the method trains with; a file template fits one mode only, so each
        mode the run asks for (the held-out score too) is checked to load."""
        for mode in {kind} | ({"score"} if needs_score else set()):
            load_template(cfg.get("template", "helpfulness"), mode)
        return {**cfg, "mode": kind}

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
        if scale.multi_digit and _reads_probs(c, scale, BACKENDS[c.backend]):
            return 1 + len({lab[0] for lab in scale.labels if len(lab) > 1})
        return 1

    def _use_probs(self) -> bool:
        return _reads_probs(self.config, self.scale, type(self.client))

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
        c, r, own = self.config, ask.request, self.config.backend_config
        settings = {f.name: getattr(own, f.name) for f in fields(own) if f.metadata.get("in_cache_key")}  # the backend's
        # The layout of the keys written before backends owned their settings (endpoint apart,
        # top_logprobs among the decoding, 20 where a backend has none), so caches made then still
        # answer — but for an openai completions judge with a ``tokenizer``, which the key left out
        # then although another tokenizer renders another prompt.
        endpoint, top_logprobs = settings.pop("endpoint", None), settings.pop("top_logprobs", 20)
        settings = {k: v for k, v in settings.items() if v is not None}
        return cache_key(
            template=self.template(ask.mode), backend=c.backend, model=c.model, prompt=ask.prompt, responses=ask.responses,
            scale=self.scale.spec(), system=c.system_prompt, endpoint=endpoint, **({"settings": settings} if settings else {}),
            decoding={"prefix": r.prefix, "candidates": r.candidates, "max_tokens": r.max_tokens,
                      "temperature": r.temperature, "seed": r.seed, "top_logprobs": top_logprobs},
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

                console.print(f"[yellow]judge: backend {self.client!r} returned no log-probabilities; labels are parsed "
                              f"from its text (a yes/no scale gives only 0 or 1; `judge/prob_label_frac` shows the share read from probabilities)[/yellow]")
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


def _reads_probs(c: JudgeConfig, scale: Scale, backend: type[Client]) -> bool:
    """Whether labels are read from next-token probabilities (else parsed from text), asked of the
    backend class's own capabilities — the one rule of the judge and of the budget's cost model."""
    if c.use_logprobs is False or not backend.supports_logprobs:
        return False
    if scale.multi_digit and (not backend.supports_prefix(c) or (backend.may_omit_logprobs and c.use_logprobs == "auto")):
        # "10" needs P("0" | "1"): a backend that cannot continue a prefix cannot ask it, and one
        # that may not return log-probs would leave a one-token answer that cannot tell 1 from 10.
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
