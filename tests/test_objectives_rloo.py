"""RLOO: the leave-one-out baseline by hand, the KL-penalised reward, K ≥ 2, tiny-model smoke."""

import math

import pytest
import torch

from daralign.core.errors import ConfigError
from daralign.objectives import get_objective
from daralign.objectives.rloo import RLOOConfig, leave_one_out_advantages
from helpers_tiny import (grads, reference_token_logps, run_step, score_feedback, shell_rollout, tiny_model,
                          tiny_rollout, tiny_train, zero_grads)


def test_leave_one_out_by_hand():
    # rewards 1, 2, 3, 6: baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3 = 11/3, 10/3, 3, 2
    adv = leave_one_out_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]]))
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected)


def test_leave_one_out_skips_invalid():
    # sample 2 invalid: baselines over the others among {1, 2, 6}: (2+6)/2, (1+6)/2, (1+2)/2
    # second prompt has one valid sample → no baseline → all 0
    adv = leave_one_out_advantages(torch.tensor([[1.0, 2.0, 99.0, 6.0], [3.0, 7.0, 0.0, 0.0]]),
                                   torch.tensor([[True, True, False, True], [True, False, False, False]]))
    expected = torch.tensor([[1 - 4.0, 2 - 3.5, 0.0, 6 - 1.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected)


def test_kl_penalised_reward_and_loss_by_hand():
    # one prompt, K = 2, kl_coef = 0.5; sequence log-probs: behaviour (−2, −4), reference (−3, −3)
    # KL estimates: (−2 − (−3), −4 − (−3)) = (1, −1);  R = r − 0.5·KL = (1 − 0.5, 0 + 0.5) = (0.5, 0.5) → A = (0, 0)
    obj = get_objective("rloo")(RLOOConfig(kl_coef=0.5), tiny_train())
    rollout = shell_rollout(1, 2, behaviour_token_logps=torch.tensor([[-1.0, -1.0], [-3.0, -1.0]]))
    ref = torch.tensor([[-1.5, -1.5], [-1.5, -1.5]])
    prepared, metrics = obj.prepare(rollout, score_feedback([[1.0, 0.0]]), ref, None)
    torch.testing.assert_close(prepared["advantages"], torch.zeros(2))
    assert metrics["objective/kl"] == pytest.approx(0.0) and metrics["objective/rlhf_reward"] == pytest.approx(0.5)
    # without the KL term: A = (1 − 0, 0 − 1) = (1, −1); loss = −mean(A·log π) with log π = (−2, −6) → −(−2 + 6)/2 = −2
    obj = get_objective("rloo")(RLOOConfig(kl_coef=0.0), tiny_train())
    assert not obj.needs_reference
    prepared, _ = obj.prepare(rollout, score_feedback([[1.0, 0.0]]), None, None)
    torch.testing.assert_close(prepared["advantages"], torch.tensor([1.0, -1.0]))
    policy = torch.tensor([-2.0, -6.0], requires_grad=True)
    loss, _ = obj.loss(policy, prepared)
    assert loss.item() == pytest.approx(-2.0)
    loss.backward()
    torch.testing.assert_close(policy.grad, torch.tensor([-0.5, 0.5]))  # ∂L/∂log π_i = −A_i / N


def test_k1_is_a_config_error():
    with pytest.raises(ConfigError, match="num_generations"):
        get_objective("rloo")(RLOOConfig(), tiny_train(num_generations=1))
    with pytest.raises(ConfigError, match="kl_coef"):
        RLOOConfig(kl_coef=-0.1)


def test_tiny_model_smoke_and_micro_batches():
    model, ref_model = tiny_model(0), tiny_model(1)
    obj = get_objective("rloo")(None, tiny_train(num_generations=3))
    rollout = tiny_rollout(model, num_prompts=3, K=3, seed=1)
    ref = reference_token_logps(ref_model, rollout)
    feedback = score_feedback([[0.1, 0.9, 0.4], [1.0, 0.0, 0.5], [0.3, 0.3, 0.2]],
                              [[True, True, True], [True, True, False], [True, True, True]])
    loss_full, _, metrics, _ = run_step(obj, model, rollout, feedback, ref)
    g_full = grads(model)
    assert math.isfinite(loss_full) and math.isfinite(metrics["objective/kl"])
    assert g_full.abs().sum() > 0 and torch.isfinite(g_full).all()
    zero_grads(model)
    loss_micro, *_ = run_step(obj, model, rollout, feedback, ref, prompts_per_micro_batch=2)
    assert loss_micro == pytest.approx(loss_full, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grads(model), g_full, rtol=1e-4, atol=1e-6)
