"""The openai backend against a REAL OpenAI-compatible server on loopback: `daralign serve-judge
--engine transformers` (i.e. `transformers serve`) with the bundled SmolLM2-135M, plus the
in-process transformers backend on the same weights. SmolLM2 judges at chance, so these tests
check plumbing and consistency, not judgement (test_judge_models.py checks judgement).

`transformers serve` ignores `logprobs`, so here labels come from parsed text; the log-prob path
of the openai backend is covered against a scripted server in test_judge.py."""

from __future__ import annotations

import pytest

from daralign.annotators.clients import Request
from daralign.annotators.openai_client import OpenAIClient
from daralign.annotators.transformers_client import TransformersClient
from daralign.annotators.judge import JudgeAnnotator

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", [{"role": "user", "content": "Say something nice about cats."}]]
GOOD = ["The capital of France is Paris.", "Cats are wonderful, affectionate companions!"]
BAD = ["I don't know, bananas?", "No."]


def server_judge(server, **over) -> JudgeAnnotator:
    cfg = {"type": "judge", "backend": "openai", "base_url": server["base_url"], "model": server["model"],
           "template": "helpfulness", "max_new_tokens": 4, "max_concurrency": 2, "timeout_s": 120, **over}
    return JudgeAnnotator.from_config(cfg)


def test_score_and_compare_through_real_server(smol_judge_server, tmp_path):
    j = server_judge(smol_judge_server, cache=str(tmp_path / "c.sqlite"))
    res = j.score(PROMPTS, GOOD)
    assert all(s in (0.0, 1.0, None) for s in res.scores)
    assert j.num_annotations == sum(s is not None for s in res.scores)
    assert res.metrics["judge/tokens"] > 0 and res.metrics["judge/latency_s"] > 0
    again = j.score(PROMPTS, GOOD)  # the cache answers the repeat
    assert again.scores == res.scores and again.metrics["judge/cache_hits"] == 2
    j.close()

    c = server_judge(smol_judge_server, mode="compare", invalid_policy="drop")
    cmp = c.compare(PROMPTS, GOOD, BAD)
    assert all(p is None or 0.0 <= p <= 1.0 for p in cmp.prob_a)
    assert 0.0 <= cmp.metrics["judge/position_flip_rate"] <= 1.0 and cmp.metrics["judge/requests"] == 4
    c.close()


def test_completions_endpoint_with_client_side_chat_template(smol_judge_server):
    c = OpenAIClient(smol_judge_server["base_url"], smol_judge_server["model"], endpoint="completions",
                     tokenizer="bundled:smollm2-135m-instruct", timeout_s=120)
    (reply,) = c.complete([Request(messages=(("user", "Is Paris in France? Answer Yes or No."),), max_tokens=3)])
    assert isinstance(reply.text, str) and reply.text.strip() and reply.tokens > 0
    c.close()


def test_in_process_backend_matches_the_server(smol_judge_server):
    """Greedy answers of the same weights agree between `transformers serve` and in-process
    (both fp32), batched with left padding."""
    reqs = [Request(messages=(("user", f"Answer Yes or No: is {x} a colour?"),), max_tokens=3)
            for x in ["red", "a chair", "blue sky at noon"]]
    local = TransformersClient("bundled:smollm2-135m-instruct", dtype="float32", batch_size=3)
    remote = OpenAIClient(smol_judge_server["base_url"], smol_judge_server["model"], timeout_s=120)
    got_local = [r.text.strip() for r in local.complete(reqs)]
    got_remote = [r.text.strip() for r in remote.complete(reqs)]
    local.close()
    remote.close()
    assert got_local == got_remote
