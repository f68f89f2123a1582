"""The `function`, `combined` and `reward_model` annotators, and how their scores become Feedback
(invalid labels, missing-EOS penalty, shuffled-reward control, annotation counting)."""

from __future__ import annotations

import math

import pytest
import torch

import tiny
from daralign.annotators import build_annotator
from daralign.core.errors import AnnotationError, ConfigError
from daralign.train.annotate import score_feedback, shuffle_rewards
from daralign.core.types import Rollout

FN = f"{tiny.TINY_PY}:"


# ---------------------------------------------------------------- function
def test_function_annotator_passes_columns_and_kwargs():
    ann = build_annotator({"type": "function", "function": FN + "column_reward", "kwargs": {"bonus": 0.5}})
    rows = [{"prompt": "a", "target": 1}, {"prompt": "b", "target": 7}]
    res = ann.score(["a", "b"], ["x", "y"], rows)
    assert res.scores == [1.5, 7.5] and ann.num_annotations == 2
    assert ann.name == "function"


def test_function_annotator_module_form_and_none_labels():
    ann = build_annotator({"type": "function", "function": "tiny:none_first_reward"})  # module:function
    res = ann.score(["p"] * 3, ["a", "b", "c"], [{"prompt": "p"}] * 3)
    assert res.scores == [None, 1.0, 2.0]
    assert ann.num_annotations == 2  # an invalid label is not an annotation


@pytest.mark.parametrize("fn,match", [
    ("nan_reward", r"score 0 is nan"), ("inf_reward", r"score 2 is inf"), ("short_reward", r"returned 2 scores for 3"),
])
def test_function_annotator_rejects_bad_scores(fn, match):
    ann = build_annotator({"type": "function", "function": FN + fn})
    with pytest.raises(AnnotationError, match=match) as e:
        ann.score(["p"] * 3, ["a", "b", "c"], [{"prompt": "p"}] * 3)
    assert f"tiny.py:{fn}" in str(e.value)  # names the function


def test_function_annotator_rejects_non_numbers(tmp_path):
    mod = tmp_path / "rewards_bad.py"
    mod.write_text("def text(prompts, completions, **kw):\n    return ['good'] * len(completions)\n"
                   "def scalar(prompts, completions, **kw):\n    return 3.0\n")
    with pytest.raises(AnnotationError, match=r"score 0 is 'good', not a number"):
        build_annotator({"type": "function", "function": f"{mod}:text"}).score(["p"], ["a"], [{"prompt": "p"}])
    with pytest.raises(AnnotationError, match=r"returned float, expected a list"):
        build_annotator({"type": "function", "function": f"{mod}:scalar"}).score(["p"], ["a"], [{"prompt": "p"}])
    with pytest.raises(ConfigError, match="file not found"):
        build_annotator({"type": "function", "function": f"{tmp_path}/nope.py:f"})


# ---------------------------------------------------------------- combined
def test_combined_is_weighted_sum_and_propagates_invalid():
    ann = build_annotator({"type": "combined", "sources": [
        {"type": "function", "function": FN + "length_reward", "weight": 2.0},
        {"type": "function", "function": FN + "none_first_reward", "weight": -0.5},
    ]})
    comps = ["hello", "eee", "abc"]
    res = ann.score(["p"] * 3, comps, [{"prompt": "p"}] * 3)
    length = [0.05 * len(c) + c.count("e") for c in comps]
    assert res.scores[0] is None  # invalid for one source → invalid
    assert res.scores[1] == pytest.approx(2 * length[1] - 0.5 * 1.0)
    assert res.scores[2] == pytest.approx(2 * length[2] - 0.5 * 2.0)
    assert res.metrics["rewards/length_reward/mean"] == pytest.approx(sum(length) / 3)
    assert res.metrics["rewards/none_first_reward/mean"] == pytest.approx(1.5)
    assert ann.num_annotations == 2  # one per response labelled by all sources
    ann.close()
    ann.close()  # safe twice


def test_combined_config_errors():
    with pytest.raises(ConfigError, match=r"sources\[0\].weight"):
        build_annotator({"type": "combined", "sources": [{"type": "function", "function": FN + "length_reward",
                                                          "weight": "heavy"}]})
    with pytest.raises(ConfigError, match=r"sources\[1\] must be a mapping"):
        build_annotator({"type": "combined", "sources": [{"type": "function", "function": FN + "length_reward"}, 3]})
    with pytest.raises(ConfigError, match="unknown key"):
        build_annotator({"type": "combined", "sources": [{"type": "function", "function": FN + "length_reward"}],
                         "mode": "sum"})


# ---------------------------------------------------------------- reward model
@pytest.fixture(scope="module")
def rm(tiny_rm_dir):
    ann = build_annotator({"type": "reward_model", "model": str(tiny_rm_dir), "batch_size": 2})
    yield ann
    ann.close()


PROMPTS = ["Tell me about the ocean.", [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "What is a good breakfast?"}], "Hi"]
COMPLETIONS = ["The ocean is big and blue.", "Eggs and toast.", "Hello! I am happy to help you with that, great question."]


def test_reward_model_uses_its_own_chat_template(rm, tiny_policy):
    _, policy_tok = tiny_policy
    text = rm._render(PROMPTS[1], COMPLETIONS[1])
    assert text == ("[[SYSTEM]] Be brief. [[END]]\n[[USER]] What is a good breakfast? [[END]]\n"
                    "[[ASSISTANT]] Eggs and toast. [[END]]\n")
    assert "<|im_start|>" not in text
    assert rm.tokenizer.chat_template != policy_tok.chat_template


def test_reward_model_scores_equal_a_manual_forward(rm):
    res = rm.score(PROMPTS, COMPLETIONS, [{"prompt": p} for p in PROMPTS])  # batch_size 2: padded batches
    assert len(res.scores) == 3 and all(math.isfinite(s) for s in res.scores)
    assert rm.num_annotations >= 3
    manual = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        msgs = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + [{"role": "assistant", "content": c}]
        text = rm.tokenizer.apply_chat_template(msgs, tokenize=False)
        enc = rm.tokenizer(text, return_tensors="pt", add_special_tokens=False)  # one sequence, no padding
        with torch.no_grad():
            manual.append(rm.model(**enc).logits[0, 0].item())
    assert res.scores == pytest.approx(manual, abs=1e-4)
    assert len({round(s, 3) for s in res.scores}) == 3  # the scores differ between responses
    # rendering with the POLICY's ChatML template would give another score: the template matters
    chatml = (f"<|im_start|>user\n{PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n{COMPLETIONS[0]}<|im_end|>\n")
    enc = rm.tokenizer(chatml, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert abs(rm.model(**enc).logits[0, 0].item() - res.scores[0]) > 1e-3


def test_reward_model_config_errors(tiny_rm_dir):
    with pytest.raises(ConfigError, match="unknown key"):
        build_annotator({"type": "reward_model", "model": str(tiny_rm_dir), "template": "x"})
    with pytest.raises(ConfigError, match="dtype"):
        build_annotator({"type": "reward_model", "model": str(tiny_rm_dir), "dtype": "int4"})


def test_combined_reward_model_and_function(tiny_rm_dir):
    ann = build_annotator({"type": "combined", "sources": [
        {"type": "reward_model", "model": str(tiny_rm_dir), "weight": 1.0},
        {"type": "function", "function": FN + "length_reward", "weight": 0.1},
    ]})
    rows = [{"prompt": p} for p in PROMPTS]
    res = ann.score(PROMPTS, COMPLETIONS, rows)
    rm_scores = ann.sources[0][1].score(PROMPTS, COMPLETIONS, rows).scores
    length = [0.05 * len(c) + c.count("e") for c in COMPLETIONS]
    assert res.scores == pytest.approx([a + 0.1 * b for a, b in zip(rm_scores, length)], abs=1e-5)
    assert "rewards/0_reward_model/mean" in res.metrics and "rewards/length_reward/mean" in res.metrics
    ann.close()


# ---------------------------------------------------------------- scores → Feedback
def _rollout(P: int, K: int, completions: list[str], is_eos: list[bool]) -> Rollout:
    N = P * K
    return Rollout(rows=[{"prompt": f"p{p}", "target": p} for p in range(P)], prompts=[f"p{p}" for p in range(P)],
                   completions=completions, input_ids=torch.zeros(N, 2, dtype=torch.long),
                   attention_mask=torch.ones(N, 2, dtype=torch.long), completion_mask=torch.tensor([[0, 1]] * N),
                   behaviour_token_logps=torch.zeros(N, 1), is_eos=torch.tensor(is_eos), num_generations=K)


def test_score_feedback_shapes_invalid_and_eos_penalty():
    ann = build_annotator({"type": "function", "function": FN + "none_first_reward"})
    r = _rollout(2, 3, ["a", "b", "c", "d", "e", "f"], [True, False, True, True, True, False])
    fb = score_feedback(ann, r, missing_eos_penalty=10.0)
    # raw: [None, 1, 2 | 3, 4, 5]; penalty −10 on samples 1 and 5; None → mean of its prompt's valid
    assert fb.valid.tolist() == [[False, True, True], [True, True, True]]
    assert fb.rewards.reshape(-1).tolist() == pytest.approx([(-9.0 + 2.0) / 2, -9.0, 2.0, 3.0, 4.0, -5.0])
    assert fb.num_annotations == 5
    assert fb.metrics["annotator/invalid_frac"] == pytest.approx(1 / 6)


def test_score_feedback_passes_each_sample_its_row():
    ann = build_annotator({"type": "function", "function": FN + "column_reward"})
    fb = score_feedback(ann, _rollout(3, 2, list("abcdef"), [True] * 6))
    assert fb.rewards.tolist() == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]  # row p's `target` for its K samples


def test_shuffle_rewards_permutes_across_the_batch():
    ann = build_annotator({"type": "function", "function": FN + "length_reward"})
    comps = ["a" * i + "e" * (i % 3) for i in range(12)]
    r = _rollout(4, 3, comps, [True] * 12)
    fb = score_feedback(ann, r)
    plain = fb.rewards
    shuffled, _ = shuffle_rewards(fb.rewards, fb.valid, torch.Generator().manual_seed(5))
    again, _ = shuffle_rewards(fb.rewards, fb.valid, torch.Generator().manual_seed(5))
    assert shuffled.shape == plain.shape == (4, 3)
    assert sorted(shuffled.reshape(-1).tolist()) == sorted(plain.reshape(-1).tolist())  # same multiset
    assert not torch.equal(shuffled, plain)  # ... in another order
    assert torch.equal(shuffled, again)  # seeded: reproducible (and so resumable)
    # across prompts, not only within: some value moved to another prompt's row
    moved = any(set(shuffled[p].tolist()) != set(plain[p].tolist()) for p in range(4))
    assert moved


def test_shuffle_moves_the_valid_mask_with_the_rewards():
    """An invalid label travels with its (placeholder) reward: the control has exactly as many
    invalid samples, and the placeholder is refilled from the prompt it lands in."""
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    valid = torch.tensor([[True, False, True], [True, True, True]])
    r, v = shuffle_rewards(rewards, valid, torch.Generator().manual_seed(3))
    assert int(v.sum()) == 5
    kept = sorted(r[v].tolist())
    assert kept == [1.0, 3.0, 4.0, 5.0, 6.0]  # the invalid sample's placeholder 2.0 is not among the valid ones
    p, k = [int(x) for x in (~v).nonzero()[0]]
    assert r[p, k] == pytest.approx(r[p][v[p]].mean().item())  # refilled with its new prompt's valid mean


def test_feedback_rejects_wrong_count_from_any_annotator():
    from daralign.annotators.base import Annotator, ScoreResult

    class Short(Annotator):
        name = "short"

        def _score(self, prompts, completions, rows):
            return ScoreResult([1.0] * (len(completions) - 1))

    with pytest.raises(AnnotationError, match="returned 3 scores for 4"):
        score_feedback(Short(), _rollout(2, 2, list("abcd"), [True] * 4))
