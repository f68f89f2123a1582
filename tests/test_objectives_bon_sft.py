"""SFT on the online Best-of-N: argmax selection, ties, invalid samples, sequence NLL, smoke."""

import math

import pytest
import torch

from daralign.core.errors import ConfigError
from daralign.objectives import get_objective
from daralign.objectives.bon_sft import best_of_n
from helpers_tiny import grads, run_step, score_feedback, shell_rollout, tiny_model, tiny_rollout, tiny_train, zero_grads


def test_picks_argmax_ties_first():
    best, has = best_of_n(torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 9.0, 9.0], [-4.0, -1.0, -2.0, -3.0]]))
    assert best.tolist() == [1, 0, 2, 1] and has.all()


def test_invalid_samples_never_win():
    rewards = torch.tensor([[1.0, 7.0, 3.0], [2.0, float("nan"), 0.0], [1.0, 1.0, 1.0]])
    valid = torch.tensor([[True, False, True], [True, False, True], [False, False, False]])
    best, has = best_of_n(rewards, valid)
    assert best[:2].tolist() == [2, 0] and has.tolist() == [True, True, False]


def test_loss_is_mean_sequence_nll_of_the_selected():
    obj = get_objective("bon-sft")(None, tiny_train(num_generations=3))
    assert not obj.needs_reference and obj.feedback_kind == "score"
    prepared, metrics = obj.prepare(shell_rollout(2, 3), score_feedback([[0.1, 0.9, 0.5], [2.0, 1.0, 2.0]]), None, None)
    assert metrics["bon/selected_reward"] == pytest.approx((0.9 + 2.0) / 2)
    policy = torch.tensor([-1.0, -4.0, -9.0, -6.0, -2.0, -3.0], requires_grad=True)
    loss, _ = obj.loss(policy, prepared)
    assert loss.item() == pytest.approx((4.0 + 6.0) / 2)  # rows 1 and 3 selected: −mean(−4, −6)
    loss.backward()
    torch.testing.assert_close(policy.grad, torch.tensor([0.0, -0.5, 0.0, -0.5, 0.0, 0.0]))


def test_k1_is_a_config_error():
    with pytest.raises(ConfigError, match="num_generations"):
        get_objective("bon-sft")(None, tiny_train(num_generations=1))


def test_tiny_model_smoke_and_micro_batches():
    model = tiny_model(0)
    obj = get_objective("bon-sft")(None, tiny_train(num_generations=4))
    rollout = tiny_rollout(model, num_prompts=3, K=4, seed=9)
    feedback = score_feedback([[0.1, 0.5, 0.2, 0.0], [1.0, 1.0, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]],
                              [[True] * 4, [True] * 4, [False] * 4])  # last prompt: nothing valid → skipped
    loss_full, _, metrics, _ = run_step(obj, model, rollout, feedback, None)
    assert metrics["bon/prompts_skipped"] == 1.0
    expected = -(rollout.behaviour_token_logps.sum(-1)[[1, 4]]).mean().item()  # behaviour = current policy
    assert loss_full == pytest.approx(expected, rel=1e-5)
    g = grads(model)
    assert math.isfinite(loss_full) and g.abs().sum() > 0 and torch.isfinite(g).all()
    zero_grads(model)
    loss_micro, *_ = run_step(obj, model, rollout, feedback, None, prompts_per_micro_batch=1)
    assert loss_micro == pytest.approx(loss_full, rel=1e-5)
    torch.testing.assert_close(grads(model), g, rtol=1e-4, atol=1e-6)
