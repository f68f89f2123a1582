"""π_t from the update's own forward (``behaviour_in_loss``, used under vLLM with one update per
batch): DAR's and GRPO's loss, gradient and metrics equal those computed with a recorded π_t, and
the log-probs they hand back are π_t's. Tiny random models; the real path runs in
tests/test_vllm_rollout.py and tests/test_vllm_server.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from daralign.objectives import get_objective
from helpers_tiny import grads, reference_token_logps, run_step, score_feedback, tiny_model, tiny_rollout, tiny_train, zero_grads


@pytest.mark.parametrize("algorithm, config", [
    ("dar", {}),
    ("dar", {"weight_clip": 1.05}),  # the clip binds for some samples: it must bind identically
    ("grpo", {"beta": 0.04}),
])
def test_pi_t_from_the_update_equals_a_recorded_pi_t(algorithm, config):
    policy, ref_model = tiny_model(0), tiny_model(1)
    rollout = tiny_rollout(policy, num_prompts=3, K=2)
    ref = reference_token_logps(ref_model, rollout)
    feedback = score_feedback([0.9, 0.1, 0.4, 0.5, 0.2, 0.8])
    cls = get_objective(algorithm)
    objective = cls(cls.Config(**config), tiny_train())
    assert cls.behaviour_in_loss

    loss_a, _, metrics_a, _ = run_step(objective, policy, rollout, feedback, ref, prompts_per_micro_batch=2)
    grads_a = grads(policy)
    zero_grads(policy)
    deferred = dataclasses.replace(rollout, behaviour_token_logps=None)
    loss_b, prepared_b, metrics_b, loss_metrics = run_step(objective, policy, deferred, feedback, ref, prompts_per_micro_batch=2)
    grads_b = grads(policy)

    assert "weights" not in prepared_b and "old_token_logps" not in prepared_b
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grads_b, grads_a, rtol=1e-4, atol=1e-7)
    recorded = torch.cat([out.pi_t_token_logps for out in loss_metrics]) * rollout.completion_mask[:, 1:]
    torch.testing.assert_close(recorded, rollout.behaviour_token_logps, rtol=0, atol=1e-5)
    # the loop then prepares again with the recorded π_t, for the metrics: the recorded path's
    _, metrics_again = objective.prepare(dataclasses.replace(rollout, behaviour_token_logps=recorded), feedback, ref, policy)
    assert metrics_again == pytest.approx(metrics_a, rel=1e-4, abs=1e-6)
    if algorithm == "dar" and config:
        assert 0 < metrics_a["dar/clip_frac"] < 1


def test_objectives_that_need_pi_t_first_keep_the_recorded_forward():
    # RLOO and PPO put log π_t into the reward (KL penalty) before the advantages: no deferral
    for name in ("rloo", "ppo", "online-dpo", "bon-sft"):
        assert not get_objective(name).behaviour_in_loss, name
