"""PPO: GAE against an independent reference, reward placement, value clipping, value head, smoke."""

import math

import pytest
import torch

from daralign.core.errors import ConfigError
from daralign.objectives import get_objective
from daralign.objectives.ppo import PPOConfig, clipped_value_loss, gae, masked_whiten
from helpers_tiny import (grads, reference_token_logps, run_step, score_feedback, tiny_model, tiny_rollout,
                          tiny_train, zero_grads)


def gae_reference(rewards, values, mask, gamma, lam):
    """Written independently of ``ppo.gae``: for each row take its completion tokens, and for each
    token sum the discounted TD errors explicitly, Â_t = Σ_l (γλ)^l δ_{t+l}."""
    out = torch.zeros_like(values, dtype=torch.float64)
    for i in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if mask[i, t]]
        r = [float(rewards[i, t]) for t in idx]
        v = [float(values[i, t]) for t in idx] + [0.0]  # terminal after the last token
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(idx))]
        for k, t in enumerate(idx):
            out[i, t] = sum((gamma * lam) ** l * deltas[k + l] for l in range(len(idx) - k))
    return out


def test_gae_by_hand():
    # 3 tokens, r = (0, 0, 1), V = 0.5 each, γ = 1, λ = 0.95:
    # δ = (0 + 0.5 − 0.5, 0 + 0.5 − 0.5, 1 + 0 − 0.5) = (0, 0, 0.5)
    # Â_2 = 0.5, Â_1 = 0 + 0.95·0.5 = 0.475, Â_0 = 0 + 0.95·0.475 = 0.45125
    adv = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3), 1.0, 0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.45125, 0.475, 0.5]]))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_independent_reference(gamma, lam):
    g = torch.Generator().manual_seed(0)
    n, T = 5, 9
    rewards, values = torch.randn(n, T, generator=g, dtype=torch.float64), torch.randn(n, T, generator=g, dtype=torch.float64)
    mask = torch.zeros(n, T)
    for i, (start, end) in enumerate([(2, 9), (3, 5), (0, 9), (4, 5), (1, 7)]):  # prompt before, padding after
        mask[i, start:end] = 1
    adv = gae(rewards * mask, values * mask, mask, gamma, lam)
    torch.testing.assert_close(adv, gae_reference(rewards, values, mask, gamma, lam))


def test_masked_whiten():
    x = torch.tensor([[9.0, 1.0, 2.0, 3.0], [9.0, 9.0, 4.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    w = masked_whiten(x, mask)
    # masked entries 1, 2, 3, 4: mean 2.5, unbiased std √(5/3)
    torch.testing.assert_close(w[mask.bool()], (torch.tensor([1.0, 2, 3, 4]) - 2.5) / math.sqrt(5 / 3), rtol=1e-6, atol=1e-6)
    assert (w[~mask.bool()] == 0).all()


def test_clipped_value_loss_by_hand():
    old, ret = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, -1.0])
    v = torch.tensor([0.1, 0.5, 0.5])
    loss, clipped = clipped_value_loss(v, old, ret, 0.2)
    # 0.1 within ±0.2: ½(0.1 − 1)² = 0.405; 0.5 → clipped 0.2: ½·max(0.25, 0.64) = 0.32 (clipped term wins);
    # 0.5 with R = −1: ½·max(2.25, 1.44) = 1.125 (unclipped wins: moving away is not rewarded)
    torch.testing.assert_close(loss, torch.tensor([0.405, 0.32, 1.125]))
    assert clipped.tolist() == [False, True, False]


@pytest.mark.parametrize("kwargs, field", [({"cliprange": 0.0}, "cliprange"), ({"cliprange_value": -1.0}, "cliprange_value"),
                                           ({"gamma": 1.5}, "gamma"), ({"lam": -0.1}, "lam"), ({"vf_coef": -1.0}, "vf_coef"),
                                           ({"kl_coef": -0.01}, "kl_coef")])
def test_impossible_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PPOConfig(**kwargs)


def test_value_head_needs_setup():
    obj = get_objective("ppo")(None, tiny_train())
    with pytest.raises(RuntimeError, match="setup"):
        obj.trainable_modules()
    model = tiny_model(0)
    obj.setup(model)
    head = obj.trainable_modules()["value_head"]
    assert isinstance(head, torch.nn.Linear) and head.in_features == 64 and head.out_features == 1
    obj.setup(model)  # idempotent: a second call keeps the same (possibly resumed) head
    assert obj.trainable_modules()["value_head"] is head


def test_returns_place_score_at_last_token_and_kl_per_token():
    # γ = λ = 1 makes GAE telescope: R_t = Â_t + V_t = Σ_{t' ≥ t} r_t', independent of the critic.
    model, ref_model = tiny_model(0), tiny_model(1)
    obj = get_objective("ppo")(PPOConfig(kl_coef=0.3, gamma=1.0, lam=1.0), tiny_train())
    obj.setup(model)
    rollout = tiny_rollout(model, num_prompts=2, K=2, seed=7)
    ref = reference_token_logps(ref_model, rollout)
    scores = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    with torch.no_grad():
        prepared, metrics = obj.prepare(rollout, score_feedback(scores), ref, model)
    mask = rollout.completion_mask[:, 1:].bool()
    kl = (rollout.behaviour_token_logps - ref) * mask
    expected = scores.reshape(-1, 1) - 0.3 * kl.flip(-1).cumsum(-1).flip(-1)  # score − kl_coef·Σ_{t'≥t} KL_t'
    torch.testing.assert_close(prepared["returns"][mask], expected[mask], rtol=1e-5, atol=1e-5)
    adv = prepared["advantages"][mask]
    assert adv.mean().abs() < 1e-5 and adv.std().item() == pytest.approx(1.0, abs=1e-4)  # whitened
    assert metrics["objective/kl"] == pytest.approx(kl.sum(-1).mean().item(), rel=1e-5)


def test_tiny_model_smoke_and_micro_batches():
    model, ref_model = tiny_model(0), tiny_model(1)
    obj = get_objective("ppo")(None, tiny_train(num_generations=2, per_device_train_batch_size=1))
    obj.setup(model)
    head = obj.trainable_modules()["value_head"]
    rollout = tiny_rollout(model, num_prompts=3, K=2, seed=8)
    ref = reference_token_logps(ref_model, rollout)
    feedback = score_feedback([[1.0, -1.0], [0.3, 0.2], [0.0, 2.0]], [[True, True], [True, False], [True, True]])
    loss_full, _, _, loss_metrics = run_step(obj, model, rollout, feedback, ref)
    g_policy, g_head = grads(model), grads(head)
    assert math.isfinite(loss_full)
    assert g_policy.abs().sum() > 0 and torch.isfinite(g_policy).all()
    assert g_head.abs().sum() > 0 and torch.isfinite(g_head).all()
    m = loss_metrics[0].metrics
    # first epoch on policy: ratio 1, nothing clipped
    assert m["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-8) and m["policy/clipfrac_avg"] == 0.0
    assert math.isfinite(m["loss/policy_avg"]) and m["loss/value_avg"] > 0
    zero_grads(model, head)
    loss_micro, *_ = run_step(obj, model, rollout, feedback, ref, prompts_per_micro_batch=2)
    assert loss_micro == pytest.approx(loss_full, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grads(model), g_policy, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads(head), g_head, rtol=1e-4, atol=1e-6)
