"""The OpenAI backend against misbehaving real servers on 127.0.0.1: HTTP 500/429, garbage bodies,
a server that hangs past the timeout, connection refused. The run recovers by retrying or stops
with one clear AnnotationError; every label is counted exactly once; the API key never leaks."""

from __future__ import annotations

import logging
import time

import pytest
from conftest import chat_reply, free_port

from daralign.annotators import build_annotator
from daralign.annotators.clients import Request
from daralign.annotators.openai_client import OpenAIClient
from daralign.annotators.judge import JudgeAnnotator
from daralign.core.errors import AnnotationError, ConfigError

FAST = {"type": "judge", "backend": "openai", "model": "m", "backoff_s": 0.01, "timeout_s": 5, "use_logprobs": False}


def judge(base_url, **over) -> JudgeAnnotator:
    return JudgeAnnotator.from_config({**FAST, "base_url": base_url, **over})


def test_recovers_from_500_and_429_and_counts_once(judge_http):
    # 1st request: 500, 2nd: 429 with Retry-After, then a readable answer.
    def handler(path, body, n):
        if n == 1:
            return 500, b"boom", {}
        if n == 2:
            return 429, {"error": "slow down"}, {"Retry-After": "0.05"}
        return 200, chat_reply("Yes"), {}

    judge_http.handler = handler
    j = judge(judge_http.base_url, max_retries=3, max_concurrency=1)
    res = j.score(["p"], ["r"])
    assert res.scores == [1.0] and j.num_annotations == 1 and len(judge_http.requests) == 3
    assert j.num_annotations == 1  # one label ...
    assert res.metrics["judge/requests"] == j.num_requests == 3  # ... for three paid requests: what the server saw


def test_gives_up_with_a_clear_error_after_max_retries(judge_http):
    judge_http.handler = lambda path, body, n: (503, b"overloaded", {})
    j = judge(judge_http.base_url, max_retries=2)
    with pytest.raises(AnnotationError, match=r"failed after 3 attempts.*503"):
        j.score(["p"], ["r"])
    assert len(judge_http.requests) == 3 and j.num_annotations == 0
    assert j.num_requests == 3  # failed attempts were sent, so they are paid for


def test_garbage_body_is_retried_then_reported(judge_http):
    judge_http.handler = lambda path, body, n: (200, b"<html>not json</html>" if n == 1 else chat_reply("No"), {})
    j = judge(judge_http.base_url, max_retries=1)
    assert j.score(["p"], ["r"]).scores == [0.0]
    judge_http.handler = lambda path, body, n: (200, {"unexpected": True}, {})
    with pytest.raises(AnnotationError, match="unreadable response body"):
        judge(judge_http.base_url, max_retries=1).score(["p"], ["r"])


def test_client_error_fails_fast_without_retry(judge_http):
    judge_http.handler = lambda path, body, n: (400, {"error": "bad model"}, {})
    with pytest.raises(AnnotationError, match="HTTP 400.*bad model"):
        judge(judge_http.base_url, max_retries=3).score(["p"], ["r"])
    assert len(judge_http.requests) == 1


def test_hanging_server_times_out_and_recovers(judge_http):
    def handler(path, body, n):
        if n == 1:
            time.sleep(2.0)  # past the 0.3 s timeout
        return 200, chat_reply("Yes"), {}

    judge_http.handler = handler
    j = judge(judge_http.base_url, timeout_s=0.3, max_retries=1)
    t0 = time.perf_counter()
    assert j.score(["p"], ["r"]).scores == [1.0]
    assert time.perf_counter() - t0 < 1.9 and j.num_annotations == 1
    judge_http.handler = lambda path, body, n: (time.sleep(2.0), (200, chat_reply("Yes"), {}))[1]
    with pytest.raises(AnnotationError, match="ReadTimeout"):
        judge(judge_http.base_url, timeout_s=0.3, max_retries=1).score(["p"], ["r"])


def test_connection_refused_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    j = judge(url, max_retries=1)
    with pytest.raises(AnnotationError, match=r"ConnectError.*check that it is running"):
        j.score(["p"], ["r"])
    assert j.num_annotations == 0


def test_partial_failure_counts_only_produced_labels_and_resumes_from_cache(judge_http, tmp_path):
    """Request 3 of 4 keeps failing: the call stops, but the replies that arrived are cached, so a
    rerun pays only for the missing one and every label is counted exactly once."""
    bad = {"r3"}
    judge_http.handler = lambda path, body, n: (
        (500, b"x", {}) if any(f"\n{r}\n" in body["messages"][-1]["content"] for r in bad) else (200, chat_reply("Yes"), {}))
    cache = tmp_path / "c.sqlite"
    j = judge(judge_http.base_url, max_retries=1, max_concurrency=1, cache=str(cache))
    with pytest.raises(AnnotationError):
        j.score(["p"] * 4, ["r1", "r2", "r3", "r4"])
    assert j.num_annotations == 0  # no result was returned, so no label was handed out
    j.close()
    bad.clear()
    judge_http.requests.clear()
    j = judge(judge_http.base_url, max_retries=1, max_concurrency=1, cache=str(cache))
    res = j.score(["p"] * 4, ["r1", "r2", "r3", "r4"])
    assert res.scores == [1.0] * 4 and j.num_annotations == 4
    paid = len(judge_http.requests)
    assert paid == 4 - res.metrics["judge/cache_hits"] and paid <= 2  # r3 (and r4 if it was cancelled)
    j.close()


def test_concurrency_limit_is_respected(judge_http):
    import threading

    live, peak, lock = [0], [0], threading.Lock()

    def handler(path, body, n):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return 200, chat_reply("Yes"), {}

    judge_http.handler = handler
    res = judge(judge_http.base_url, max_concurrency=3).score(["p"] * 12, [f"r{i}" for i in range(12)])
    assert res.scores == [1.0] * 12 and 1 < peak[0] <= 3


def test_api_key_never_leaks(judge_http, monkeypatch, tmp_path, caplog):
    secret = "sk-test-THIS-MUST-NOT-LEAK-1234567890"
    monkeypatch.setenv("DARALIGN_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    judge_http.handler = lambda path, body, n: (200, chat_reply("Yes"), {})
    cache = tmp_path / "cache.sqlite"
    j = judge(judge_http.base_url, api_key_env="DARALIGN_TEST_KEY", cache=str(cache))
    res = j.score(["p"], ["r"])
    assert judge_http.requests[0][2]["Authorization"] == f"Bearer {secret}"  # it is sent...
    seen = [repr(j), repr(j.client), repr(j.config), str(res), repr(j.client._http.headers)]
    # ...but a server that echoes the key back in an error does not get it into our exception.
    judge_http.handler = lambda path, body, n: (500, f"bad key {body and secret}".encode(), {})
    with pytest.raises(AnnotationError) as err:
        judge(judge_http.base_url, api_key_env="DARALIGN_TEST_KEY", max_retries=1).score(["p"], ["other"])
    seen += [str(err.value), repr(err.value), caplog.text]
    j.close()
    seen.append(cache.read_bytes().decode("latin-1"))
    for text in seen:
        assert secret not in text
    assert "***" in str(err.value)


def test_missing_key_env_is_a_config_error(monkeypatch):
    monkeypatch.delenv("DARALIGN_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="DARALIGN_NO_SUCH_KEY"):
        OpenAIClient("http://127.0.0.1:9/v1", "m", api_key_env="DARALIGN_NO_SUCH_KEY")


def test_completions_endpoint_reads_legacy_logprobs(judge_http):
    body_out = {"choices": [{"text": "Yes", "logprobs": {"top_logprobs": [{" Yes": -0.1, " No": -2.4}]}}],
                "usage": {"total_tokens": 9}}
    judge_http.handler = lambda path, body, n: (200, body_out, {})
    c = OpenAIClient(judge_http.base_url, "m", endpoint="completions", max_retries=0)
    (reply,) = c.complete([Request(messages=(("user", "q"),), candidates=("Yes", "No"))])
    path, body, _ = judge_http.requests[0]
    assert path == "/v1/completions" and body["logprobs"] == 20 and body["prompt"].endswith("Assistant:")
    assert reply.probs["Yes"] == pytest.approx(0.905, abs=1e-3) and reply.tokens == 9
    c.close()


# -- hosted judges: rate limits, token usage and cost ------------------------------------------


def test_rate_limit_spreads_requests_and_tokens_on_a_fake_clock():
    from daralign.annotators.clients import RateLimit

    now = [0.0]
    limit = RateLimit(requests_per_minute=30, tokens_per_minute=600, clock=lambda: now[0],
                      sleep=lambda s: now.__setitem__(0, now[0] + s))
    starts = []
    for _ in range(3):
        limit.wait(10)  # 10 tokens hold the next request back 1 s; the request limit, 2 s
        starts.append(now[0])
    assert starts == [0.0, 2.0, 4.0]
    booked = limit.wait(50)  # 5 s of tokens booked ...
    limit.settle(booked, 200)  # ... but 200 were billed: the next request waits 20 s after it
    limit.wait(1)
    assert now[0] == pytest.approx(6.0 + 20.0)


def test_a_burst_is_spread_to_the_limit_and_priced(judge_http):
    """Four requests at 240 a minute reach a real loopback server at least 0.25 s apart; the token
    usage the server reports is summed and priced."""
    import time as _time

    arrivals = []

    def handler(path, body, n):
        arrivals.append(_time.monotonic())
        body = chat_reply("Yes", tokens=100)
        body["usage"] = {"prompt_tokens": 90, "completion_tokens": 10, "total_tokens": 100}
        return 200, body, {}

    judge_http.handler = handler
    j = build_annotator({"type": "judge", "backend": "openai", "base_url": judge_http.base_url, "model": "m",
                         "use_logprobs": False, "requests_per_minute": 240, "max_concurrency": 4,
                         "price_per_1k_input_tokens": 0.5, "price_per_1k_output_tokens": 2.0})
    res = j.score(["p"] * 4, ["a", "b", "c", "d"])
    gaps = [b - a for a, b in zip(sorted(arrivals), sorted(arrivals)[1:])]
    assert len(arrivals) == 4 and min(gaps) >= 0.25 - 0.02  # spread, never a burst (a lower bound only)
    assert res.metrics["judge/tokens"] == 400
    assert res.metrics["judge/cost"] == pytest.approx((360 * 0.5 + 40 * 2.0) / 1000)


def test_a_server_without_log_probs_is_said_once(judge_http, capsys):
    judge_http.handler = lambda path, body, n: (200, chat_reply("Yes"), {})  # no logprobs in the body
    j = build_annotator({"type": "judge", "backend": "openai", "base_url": judge_http.base_url, "model": "m"})
    first = j.score(["p"] * 2, ["a", "b"])
    j.score(["p"], ["c"])
    err = capsys.readouterr().err
    assert err.count("returned no log-probabilities") == 1
    assert first.scores == [1.0, 1.0] and first.metrics["judge/prob_label_frac"] == 0.0
