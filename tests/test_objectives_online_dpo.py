"""OAIF online DPO / IPO / SLiC: hand-computed margins, pair bookkeeping, tiny-model smoke."""

import math

import pytest
import torch

from daralign.core.errors import ConfigError
from daralign.objectives import get_objective
from daralign.objectives.online_dpo import OnlineDPOConfig, preference_loss
from helpers_tiny import (compare_feedback, grads, reference_token_logps, run_step, shell_rollout, tiny_model,
                          tiny_rollout, tiny_train, zero_grads)

# One pair by hand: log π_θ(y_w)=−10, log π_θ(y_l)=−12, log π_ref(y_w)=log π_ref(y_l)=−11, β=0.1
# h = (−10 − (−11)) − (−12 − (−11)) = 1 − (−1) = 2,  β·h = 0.2
CHOSEN, REJECTED, REF_C, REF_R, BETA = -10.0, -12.0, -11.0, -11.0, 0.1


@pytest.mark.parametrize("loss_type, expected, dloss_dchosen", [
    # −log σ(0.2) = log(1 + e^−0.2) = log(1.8187307531) ;  d/dh = −β(1 − σ(βh)) = −0.1·(1 − 0.5498339973)
    ("sigmoid", 0.5981388693, -0.0450166003),
    # (h − 1/(2β))² = (2 − 5)² = 9 ;  d/dh = 2(h − 5) = −6
    ("ipo", 9.0, -6.0),
    # max(0, 1 − 0.2) = 0.8 ;  d/dh = −β = −0.1
    ("hinge", 0.8, -0.1),
])
def test_losses_by_hand(loss_type, expected, dloss_dchosen):
    chosen = torch.tensor([CHOSEN], dtype=torch.float64, requires_grad=True)
    losses, rc, rr = preference_loss(chosen, torch.tensor([REJECTED], dtype=torch.float64),
                                     torch.tensor([REF_C], dtype=torch.float64), torch.tensor([REF_R], dtype=torch.float64),
                                     beta=BETA, loss_type=loss_type)
    assert losses.item() == pytest.approx(expected, abs=1e-9)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)  # β·(log π_θ − log π_ref)
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(dloss_dchosen, abs=1e-9)


def test_hinge_is_flat_past_the_margin():
    # h = 20 → β·h = 2 > 1: SLiC loss 0, no gradient
    chosen = torch.tensor([0.0], requires_grad=True)
    loss, _, _ = preference_loss(chosen, torch.tensor([-20.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1, loss_type="hinge")
    loss.sum().backward()
    assert loss.item() == 0.0 and chosen.grad.item() == 0.0


def test_registered_names_default_loss_types():
    train = tiny_train()
    for name, loss_type in [("online-dpo", "sigmoid"), ("online-ipo", "ipo"), ("online-slic", "hinge")]:
        cls = get_objective(name)
        assert cls.feedback_kind == "compare" and cls.needs_reference
        assert cls.Config().loss_type == loss_type
        assert cls(cls.Config(), train).config.loss_type == loss_type


@pytest.mark.parametrize("kwargs, field", [({"beta": 0.0}, "beta"), ({"beta": -1}, "beta"), ({"loss_type": "kto"}, "loss_type")])
def test_impossible_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        OnlineDPOConfig(**kwargs)


def test_one_pair_per_prompt_by_default_whatever_the_shared_k():
    """OAIF samples two responses per prompt; the reward methods' num_generations does not apply."""
    assert get_objective("online-dpo")(OnlineDPOConfig(), tiny_train(num_generations=4)).num_generations() == 2
    assert get_objective("online-ipo")(None, tiny_train(num_generations=1)).num_generations() == 2
    assert get_objective("online-dpo")(OnlineDPOConfig(oaif_num_generations=4), tiny_train()).num_generations() == 4
    with pytest.raises(ConfigError, match="oaif_num_generations must be an integer ≥ 2"):
        OnlineDPOConfig(oaif_num_generations=1)


def test_prepare_orders_pairs_and_skips_ties():
    # 3 prompts, K = 2. Prompt 0: sample 0 preferred (0.9); prompt 1: sample 3 preferred (0.2 < 0.5);
    # prompt 2: tie (0.5, e.g. the two orders disagreed) → skipped.
    obj = get_objective("online-dpo")(OnlineDPOConfig(beta=BETA), tiny_train())
    rollout = shell_rollout(3, 2)
    ref = torch.tensor([[-11.0], [-11.0], [-11.0], [-11.0], [-3.0], [-4.0]])
    prepared, metrics = obj.prepare(rollout, compare_feedback([(0, 1), (2, 3), (4, 5)], [0.9, 0.2, 0.5]), ref, None)
    assert metrics["pairs/used"] == 2 and metrics["pairs/ties_skipped"] == 1
    policy = torch.tensor([-10.0, -12.0, -12.0, -10.0, -1.0, -9.0])
    loss, m = obj.loss(policy, prepared)
    # both used pairs have h = 2 (prompt 1 with winner = sample 3), so the mean loss is −log σ(0.2)
    assert loss.item() == pytest.approx(0.5981388693, abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(0.1) and m["rewards/rejected"] == pytest.approx(-0.1)
    assert m["rewards/margins"] == pytest.approx(0.2) and m["rewards/accuracies"] == 1.0
    assert m["logps/chosen"] == pytest.approx(-10.0) and m["logps/rejected"] == pytest.approx(-12.0)


def test_averaged_both_orders_tie_is_a_tie():
    obj = get_objective("online-dpo")(OnlineDPOConfig(), tiny_train())
    pref = (0.7 + 0.3) / 2  # 0.49999999999999994 in floating point
    _, metrics = obj.prepare(shell_rollout(1, 2), compare_feedback([(0, 1)], [pref]), torch.zeros(2, 1), None)
    assert metrics["pairs/ties_skipped"] == 1 and metrics["pairs/used"] == 0


def test_best_vs_worst_of_four_and_nonfinite_preference():
    obj = get_objective("online-ipo")(None, tiny_train(num_generations=4))
    rollout = shell_rollout(2, 4)
    # prompt 0: best 2 vs worst 0 (preferred); prompt 1: NaN preference (invalid judge output) → skipped
    prepared, metrics = obj.prepare(rollout, compare_feedback([(2, 0), (5, 7)], [1.0, float("nan")]), torch.zeros(8, 1), None)
    assert metrics["pairs/used"] == 1 and metrics["pairs/invalid_skipped"] == 1
    policy = torch.tensor([-3.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    loss, _ = obj.loss(policy, prepared)
    assert loss.item() == pytest.approx((2.0 - 5.0) ** 2)  # h = −1 − (−3) = 2, (2 − 1/(2·0.1))² = 9


def test_pair_across_prompts_is_rejected():
    obj = get_objective("online-dpo")(OnlineDPOConfig(), tiny_train())
    with pytest.raises(ValueError, match="same prompt"):
        obj.prepare(shell_rollout(2, 2), compare_feedback([(1, 2)], [1.0]), torch.zeros(4, 1), None)


@pytest.mark.parametrize("name", ["online-dpo", "online-ipo", "online-slic"])
def test_tiny_model_smoke_and_micro_batches(name):
    model, ref_model = tiny_model(0), tiny_model(1)
    train = tiny_train(num_generations=2)
    obj = get_objective(name)(None, train)
    rollout = tiny_rollout(model, num_prompts=4, K=2)
    ref = reference_token_logps(ref_model, rollout)
    feedback = compare_feedback([(0, 1), (2, 3), (4, 5), (6, 7)], [0.8, 0.1, 0.5, 1.0])  # one tie
    loss_full, _, metrics, loss_metrics = run_step(obj, model, rollout, feedback, ref)
    g_full = grads(model)
    assert math.isfinite(loss_full) and metrics["pairs/used"] == 3
    assert g_full.abs().sum() > 0 and torch.isfinite(g_full).all()
    assert "rewards/margins" in loss_metrics[0].metrics
    zero_grads(model)
    # micro-batches of one prompt give the same loss and gradients (the tie's micro-batch adds 0)
    loss_micro, *_ = run_step(obj, model, rollout, feedback, ref, prompts_per_micro_batch=1)
    assert loss_micro == pytest.approx(loss_full, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grads(model), g_full, rtol=1e-4, atol=1e-6)
