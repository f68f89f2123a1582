"""Offline DPO: the loop's chosen/rejected layout, hand-computed loss, tiny-model smoke."""

import math

import pytest
import torch
import torch.nn.functional as F

from daralign.objectives import get_objective
from daralign.objectives.offline_dpo import DPOConfig
from daralign.core.types import Feedback
from helpers_tiny import grads, reference_token_logps, run_step, shell_rollout, tiny_model, tiny_rollout, tiny_train


def offline_feedback(num_prompts: int) -> Feedback:
    """What the loop builds for prompt/chosen/rejected rows: chosen at k=0, rejected at k=1."""
    return Feedback(num_annotations=0, pairs=[(2 * p, 2 * p + 1) for p in range(num_prompts)],
                    preference=torch.ones(num_prompts))


def test_registered_offline_with_dpo_defaults():
    cls = get_objective("dpo")
    assert cls.feedback_kind == "offline" and cls.needs_reference
    assert DPOConfig() == DPOConfig(beta=0.1, loss_type="sigmoid")
    cls(None, tiny_train(num_generations=4))  # K of the online sampler does not matter offline


def test_hand_computed_loss():
    # β = 0.5; rows: chosen 0, rejected 1 (prompt 0), chosen 2, rejected 3 (prompt 1)
    obj = get_objective("dpo")(DPOConfig(beta=0.5), tiny_train())
    ref = torch.tensor([[-6.0], [-8.0], [-4.0], [-2.0]])
    prepared, _ = obj.prepare(shell_rollout(2, 2), offline_feedback(2), ref, None)
    policy = torch.tensor([-5.0, -9.0, -4.0, -4.0])
    loss, m = obj.loss(policy, prepared)
    # prompt 0: h = 1 − (−1) = 2 → −log σ(1.0) = 0.3132616875
    # prompt 1: h = 0 − (−2) = 2 → −log σ(1.0) = 0.3132616875
    assert loss.item() == pytest.approx(0.3132616875, abs=1e-7)
    assert m["rewards/accuracies"] == 1.0 and m["rewards/margins"] == pytest.approx(1.0)


def test_tiny_model_smoke_matches_direct_formula():
    model, ref_model = tiny_model(0), tiny_model(1)
    obj = get_objective("dpo")(None, tiny_train())
    rollout = tiny_rollout(model, num_prompts=3, K=2, seed=3)
    ref = reference_token_logps(ref_model, rollout)
    loss, _, metrics, _ = run_step(obj, model, rollout, offline_feedback(3), ref, prompts_per_micro_batch=2)
    g = grads(model)
    assert math.isfinite(loss) and metrics["pairs/used"] == 3
    assert g.abs().sum() > 0 and torch.isfinite(g).all()
    # against −mean log σ(β·h) written out directly
    with torch.no_grad():
        pol = (rollout.behaviour_token_logps).sum(-1)  # behaviour = current policy here
        r = ref.sum(-1)
        h = (pol[0::2] - r[0::2]) - (pol[1::2] - r[1::2])
        expected = -F.logsigmoid(0.1 * h).mean().item()
    assert loss == pytest.approx(expected, rel=1e-5)
