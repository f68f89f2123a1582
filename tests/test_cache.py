"""The persistent judge cache: repeated runs never pay twice, keys change with everything that
changes the answer, and a process killed mid-write leaves a readable database."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import chat_reply

from daralign.annotators.cache import ResponseCache, cache_key
from daralign.annotators.judge import JudgeAnnotator


def judge(server, cache, **over) -> JudgeAnnotator:
    cfg = {"type": "judge", "backend": "openai", "base_url": server.base_url, "model": "m", "max_retries": 0,
           "cache": str(cache), "use_logprobs": False, **over}
    return JudgeAnnotator.from_config(cfg)


def test_roundtrip_and_persistence(tmp_path):
    path = tmp_path / "sub" / "c.sqlite"
    c = ResponseCache(path)
    c.put("k", {"text": "Yes", "probs": {"Yes": 0.9}, "tokens": 3})
    c.close()
    c = ResponseCache(path)
    assert c.get("k") == {"text": "Yes", "probs": {"Yes": 0.9}, "tokens": 3} and c.get("other") is None
    assert len(c) == 1
    c.close()


def test_repeated_run_pays_nothing(judge_http, tmp_path):
    cache = tmp_path / "c.sqlite"
    judge_http.handler = lambda path, body, n: (200, chat_reply("Yes" if "good" in body["messages"][-1]["content"] else "No"), {})
    first = judge(judge_http, cache)
    res1 = first.score(["p", "p", "q"], ["good", "bad", "good"])
    first.close()
    assert len(judge_http.requests) == 3 and res1.metrics["judge/cache_hits"] == 0

    again = judge(judge_http, cache)
    res2 = again.score(["p", "p", "q"], ["good", "bad", "good"])
    assert len(judge_http.requests) == 3  # nothing new was sent
    assert res2.scores == res1.scores == [1.0, 0.0, 1.0]
    assert res2.metrics["judge/cache_hits"] == 3 and res2.metrics["judge/tokens"] == 0
    assert again.num_annotations == 3  # cached labels are still labels for the budget
    again.close()


def test_compare_caches_each_order(judge_http, tmp_path):
    cache = tmp_path / "c.sqlite"
    j = judge(judge_http, cache, mode="compare")
    judge_http.handler = lambda path, body, n: (200, chat_reply("A"), {})
    j.compare(["p"], ["x"], ["y"])
    assert len(judge_http.requests) == 2
    j.compare(["p"], ["y"], ["x"])  # the same two orders, already paid for
    assert len(judge_http.requests) == 2
    j.close()


@pytest.mark.parametrize(
    "change",
    [{"template": "helpfulness"}, {"model": "other"}, {"temperature": 0.5}, {"scale": "1-9"}, {"system_prompt": "Be strict."}],
)
def test_anything_that_changes_the_answer_changes_the_key(judge_http, tmp_path, change):
    cache = tmp_path / "c.sqlite"
    base = judge(judge_http, cache, template="tone")
    base.score(["p"], ["r"])
    base.close()
    changed = judge(judge_http, cache, **{"template": "tone", **change})
    assert changed.score(["p"], ["r"]).metrics["judge/cache_hits"] == 0
    changed.close()


def test_key_ignores_nothing_that_matters():
    base = dict(template="t", backend="openai", model="m", prompt="p", responses=("a",), decoding={"temperature": 0})
    assert cache_key(**base) == cache_key(**dict(base))
    for field, value in [("prompt", "p2"), ("responses", ("b",)), ("responses", ("a", "b")), ("decoding", {"temperature": 1})]:
        assert cache_key(**{**base, field: value}) != cache_key(**base)



@pytest.mark.parametrize("backend", [{"backend": "transformers"}, {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"},
                                     {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "endpoint": "completions"}])
def test_caches_written_before_backends_owned_their_settings_still_answer(backend):
    """The key of a request as daralign wrote it when the judge's settings were one flat dataclass
    (endpoint for openai alone, top_logprobs among the decoding): the same key now."""
    from daralign.annotators.judge import _Ask
    from daralign.annotators.clients import Request

    j = JudgeAnnotator.from_config({"type": "judge", "model": "m", "template": "tone", **backend})
    request = Request(messages=(("user", "q"),), candidates=("Yes", "No"))
    old = cache_key(template=j.template("score"), backend=backend["backend"], model="m", prompt="p", responses=("r",),
                    scale=j.scale.spec(), system=None, endpoint=backend.get("endpoint", "chat") if backend["backend"] == "openai" else None,
                    decoding={"prefix": "", "candidates": ("Yes", "No"), "max_tokens": 1, "temperature": 0.0, "seed": None,
                              "top_logprobs": 20})
    assert j._key(_Ask(request, ("r",), "p")) == old

WRITER = """
import sys
from daralign.annotators.cache import ResponseCache
c = ResponseCache(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    c.put_many([(f"k{i}-{j}", {"text": "x" * 500, "probs": None, "tokens": j}) for j in range(50)])
    i += 1
"""


def test_killed_writer_leaves_a_consistent_cache(tmp_path):
    """SIGKILL a process in the middle of writing 50-row transactions: the file passes sqlite's
    integrity check, every row parses, and only whole transactions are present."""
    path = tmp_path / "c.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    values = [json.loads(v) for (v,) in db.execute("SELECT value FROM replies")]
    db.close()
    assert len(values) > 0 and len(values) % 50 == 0
    c = ResponseCache(path)  # reopens and keeps working
    c.put("after", {"text": "Yes", "probs": None, "tokens": 1})
    assert c.get("after")["text"] == "Yes"
    c.close()


def test_the_tokenizer_of_a_completions_judge_is_in_its_key(tiny_policy_dir):
    """Another tokenizer renders another prompt for the completions endpoint: another key (the one
    key that changed when backends came to own their settings)."""
    from daralign.annotators.clients import Request
    from daralign.annotators.judge import _Ask

    ask = _Ask(Request(messages=(("user", "q"),)), ("r",), "p")
    keys = {JudgeAnnotator.from_config({"type": "judge", "model": "m", "backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                                        "endpoint": "completions", **tok})._key(ask) for tok in ({}, {"tokenizer": str(tiny_policy_dir)})}
    assert len(keys) == 2
