"""GRPO: group advantages by hand, the clip active/inactive, k3 KL, token-level averaging, smoke."""

import math

import pytest
import torch

from daralign.core.errors import ConfigError
from daralign.objectives import get_objective
from daralign.objectives.grpo import GRPOConfig, clipped_surrogate, group_advantages, k3_kl
from helpers_tiny import (grads, reference_token_logps, run_step, score_feedback, tiny_model, tiny_rollout,
                          tiny_train, zero_grads)


def test_group_advantages_by_hand():
    # group (1, 2, 3): mean 2, unbiased std 1 → (−1, 0, 1)/(1 + eps); group (4, 4, 4): std 0 → 0
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]]), eps=1e-4)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64) / torch.tensor([[1 + 1e-4], [1.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected)
    # sample 1 invalid: group (1, 3) has mean 2, std √2 → (−1/(√2+eps), 0, 1/(√2+eps))
    adv = group_advantages(torch.tensor([[1.0, 50.0, 3.0]]), torch.tensor([[True, False, True]]), eps=1e-4)
    s = math.sqrt(2) + 1e-4
    torch.testing.assert_close(adv, torch.tensor([[-1 / s, 0.0, 1 / s]], dtype=torch.float64))


@pytest.mark.parametrize("ratio, adv, loss, clipped, grad", [
    (1.1, 1.0, -1.1, False, -1.1),   # inside [0.8, 1.2]: −ρA, ∂/∂log π = −ρA
    (1.5, 1.0, -1.2, True, 0.0),     # A > 0, ρ > 1+ε: clipped to −(1.2)·A, no gradient
    (0.5, -1.0, 0.8, True, 0.0),     # A < 0, ρ < 1−ε: clipped to −(0.8)·A, no gradient
    (0.5, 1.0, -0.5, False, -0.5),   # A > 0, ρ < 1−ε: the min keeps the unclipped (pessimistic) term
    (1.5, -1.0, 1.5, False, 1.5),    # A < 0, ρ > 1+ε: likewise unclipped
])
def test_clip_active_and_inactive(ratio, adv, loss, clipped, grad):
    old = torch.tensor([[-2.0]], dtype=torch.float64)
    logps = (old + math.log(ratio)).requires_grad_(True)
    per_token, is_clipped = clipped_surrogate(logps, old, torch.tensor([[adv]], dtype=torch.float64), 0.2)
    per_token.sum().backward()
    assert per_token.item() == pytest.approx(loss) and bool(is_clipped) == clipped
    assert logps.grad.item() == pytest.approx(grad)


def test_k3_kl_by_hand():
    # log π = −1, log π_ref = −2: e^{−1} − (−1) − 1 = 0.36787944
    assert k3_kl(torch.tensor(-1.0), torch.tensor(-2.0)).item() == pytest.approx(math.exp(-1))
    assert k3_kl(torch.tensor(-1.5), torch.tensor(-1.5)).item() == 0.0


@pytest.mark.parametrize("kwargs, field", [({"beta": -0.1}, "beta"), ({"epsilon": 0.0}, "epsilon"), ({"epsilon": 1.5}, "epsilon")])
def test_impossible_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        GRPOConfig(**kwargs)


def test_k1_is_a_config_error():
    with pytest.raises(ConfigError, match="num_generations"):
        get_objective("grpo")(None, tiny_train(num_generations=1))


def test_token_level_average_on_policy():
    # behaviour = current policy (ρ = 1) and reference = policy (KL = 0): L = −Σ_i A_i·|y_i| / Σ_i |y_i|
    model = tiny_model(0)
    obj = get_objective("grpo")(None, tiny_train(num_generations=2))
    rollout = tiny_rollout(model, num_prompts=2, K=2, seed=4)
    rewards = [[1.0, 0.0], [0.0, 2.0]]
    loss, prepared, metrics, loss_metrics = run_step(obj, model, rollout, score_feedback(rewards),
                                                    rollout.behaviour_token_logps)
    a0 = 0.5 / (math.sqrt(0.5) + 1e-4)  # group (1, 0): mean 0.5, std √0.5 → ±0.5/(√0.5 + eps)
    a1 = 1.0 / (math.sqrt(2.0) + 1e-4)  # group (0, 2): mean 1, std √2 → ±1/(√2 + eps)
    adv = torch.tensor([a0, -a0, -a1, a1], dtype=torch.float64)
    lengths = rollout.completion_lengths.double()
    assert loss == pytest.approx((-(adv * lengths).sum() / lengths.sum()).item(), rel=1e-5)
    assert loss_metrics[0].metrics["grpo/kl"] == pytest.approx(0.0, abs=1e-6) and loss_metrics[0].metrics["clip_ratio/region_mean"] == 0.0
    assert metrics["frac_reward_zero_std"] == 0.0


def test_tiny_model_smoke_and_micro_batches():
    model, ref_model = tiny_model(0), tiny_model(1)
    obj = get_objective("grpo")(GRPOConfig(beta=0.04, epsilon=0.2), tiny_train(num_generations=2))
    rollout = tiny_rollout(model, num_prompts=3, K=2, seed=5)
    rollout.behaviour_token_logps = rollout.behaviour_token_logps * 0.8  # off-policy: some ratios leave the clip range
    ref = reference_token_logps(ref_model, rollout)
    feedback = score_feedback([[1.0, 0.0], [0.2, 0.7], [0.5, 0.5]])
    loss_full, _, metrics, loss_metrics = run_step(obj, model, rollout, feedback, ref)
    g_full = grads(model)
    assert math.isfinite(loss_full) and metrics["frac_reward_zero_std"] == pytest.approx(1 / 3)
    assert loss_metrics[0].metrics["grpo/kl"] > 0 and loss_metrics[0].metrics["clip_ratio/region_mean"] > 0
    assert g_full.abs().sum() > 0 and torch.isfinite(g_full).all()
    zero_grads(model)
    loss_micro, *_ = run_step(obj, model, rollout, feedback, ref, prompts_per_micro_batch=1)
    assert loss_micro == pytest.approx(loss_full, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grads(model), g_full, rtol=1e-4, atol=1e-6)


def test_beta_zero_needs_no_reference():
    model = tiny_model(0)
    obj = get_objective("grpo")(GRPOConfig(beta=0.0), tiny_train())
    assert not obj.needs_reference
    rollout = tiny_rollout(model, num_prompts=2, K=2, seed=6)
    loss, *_ = run_step(obj, model, rollout, score_feedback([[1.0, 0.0], [0.0, 1.0]]), None)
    assert math.isfinite(loss)
