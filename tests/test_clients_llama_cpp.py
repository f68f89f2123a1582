"""The llama_cpp backends on the bundled Qwen judge GGUF: in-process (llama-cpp-python) and the
llama.cpp server started by `daralign serve-judge --engine llama_cpp`, whose chat endpoint
returns top log-probabilities, so the openai backend reads P(Yes) instead of parsing text.
Skipped with a reason when llama-cpp-python (an optional, compiled dependency) is missing."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import judge_server, loopback_server

from daralign.annotators.judge import JudgeAnnotator, JudgeConfig
from daralign.core.errors import ConfigError

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python not installed (pip install 'daralign[llama-cpp]', compiles ~8 min)")

PROMPTS = ["What's the capital of France?", "Write a sentence about Mondays."]
POS = ["Great question! The capital of France is Paris — a wonderful, vibrant city full of art, food and charm. "
       "I hope you get to visit it someday!",
       "Mondays are a fresh, exciting start — a brand-new chance to chase your dreams and make the week amazing!"]
NEG = ["Paris. Obviously. Look it up next time.", "Mondays are tedious and everyone hates them."]


@pytest.mark.skipif(HAVE_LLAMA, reason="checks the message shown when llama-cpp-python is missing")
def test_missing_llama_cpp_is_a_clear_config_error():
    j = JudgeAnnotator.from_config({"type": "judge", "backend": "llama_cpp", "model": "bundled:qwen2.5-coder-0.5b-instruct"})
    with pytest.raises(ConfigError, match="llama-cpp-python"):
        j.score(["p"], ["r"])


@pytest.fixture(scope="module")
def llama_client():
    from daralign.annotators.llama_cpp_client import LlamaCppClient

    client = LlamaCppClient("bundled:qwen2.5-coder-0.5b-instruct", n_ctx=2048)
    yield client
    client.close()


@pytest.mark.slow
@needs_llama
def test_in_process_llama_cpp_tone_and_compare(llama_client):
    j = JudgeAnnotator(JudgeConfig(backend="llama_cpp", template="tone"), client=llama_client)
    res = j.score(PROMPTS + PROMPTS, POS + NEG)
    print("llama_cpp tone P(yes) enthusiastic", res.scores[:2], "flat", res.scores[2:])
    assert all(p > n for p, n in zip(res.scores[:2], res.scores[2:]))
    j10 = JudgeAnnotator(JudgeConfig(backend="llama_cpp", template="tone", scale="1-10"), client=llama_client)
    assert all(1 <= s <= 10 for s in j10.score(PROMPTS, NEG).scores)
    c = JudgeAnnotator(JudgeConfig(backend="llama_cpp", template="tone", mode="compare"), client=llama_client)
    out = c.compare(PROMPTS, POS, NEG)
    assert all(0 <= p <= 1 for p in out.prob_a) and c.num_annotations == 2


@pytest.fixture(scope="module")
def llama_server():
    with loopback_server("llama_server", 180) as server:
        yield judge_server(server)


@pytest.mark.slow
@needs_llama
def test_llama_cpp_server_gives_probabilities_through_openai_backend(llama_server, llama_client):
    cfg = {"type": "judge", "backend": "openai", "base_url": llama_server["base_url"], "model": llama_server["model"],
           "template": "tone", "use_logprobs": True, "timeout_s": 120}
    j = JudgeAnnotator.from_config(cfg)
    res = j.score(PROMPTS + PROMPTS, POS + NEG)
    print("llama.cpp server tone P(yes) enthusiastic", res.scores[:2], "flat", res.scores[2:])
    assert all(s is not None and 0 < s < 1 for s in res.scores)  # probabilities, not parsed 0/1
    assert all(p > n for p, n in zip(res.scores[:2], res.scores[2:]))
    local = JudgeAnnotator(JudgeConfig(backend="llama_cpp", template="tone"), client=llama_client).score(PROMPTS, POS).scores
    assert res.scores[:2] == pytest.approx(local, abs=0.05)  # same GGUF, same prompt
    cmp = JudgeAnnotator.from_config({**cfg, "mode": "compare"}).compare(PROMPTS, POS, NEG)
    assert all(p is not None and 0 < p < 1 for p in cmp.prob_a)
    j.close()
