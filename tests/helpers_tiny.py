"""Tiny random models and hand-built rollouts for the objective tests (no Hub, CPU, < 1 s each).

``run_step`` drives an objective the way the loop does: reference log-probs, ``prepare`` under
``no_grad``, then ``compute_loss`` on micro-batches of whole prompt groups, each loss scaled by
(micro-batch rows / N) before ``backward``.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from daralign.core.config import TrainConfig
from daralign.core.models import token_logps
from daralign.core.types import Feedback, Rollout

VOCAB = 300
PAD = 0


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    return LlamaForCausalLM(config)


def tiny_train(**overrides) -> TrainConfig:
    return TrainConfig(**{"num_generations": 2, "per_device_train_batch_size": 2, **overrides})


def tiny_rollout(model, num_prompts: int = 3, K: int = 2, prompt_len: int = 4, completion_len: int = 5,
                 seed: int = 0, temperature: float = 1.0) -> Rollout:
    """Random tokens laid out like the HF rollout: left-padded prompt (shared by the K samples of a
    prompt), right-padded completion of random length ≥ 1; behaviour log-probs from ``model``."""
    g = torch.Generator().manual_seed(seed)
    N, L = num_prompts * K, prompt_len + completion_len
    input_ids = torch.randint(3, VOCAB, (N, L), generator=g)
    attention_mask = torch.ones(N, L, dtype=torch.long)
    completion_mask = torch.zeros(N, L, dtype=torch.long)
    is_eos = torch.zeros(N, dtype=torch.bool)
    for p in range(num_prompts):
        pad = int(torch.randint(0, prompt_len - 1, (1,), generator=g))
        prompt = input_ids[p * K, :prompt_len].clone()
        for k in range(K):
            row = p * K + k
            input_ids[row, :prompt_len] = prompt
            input_ids[row, :pad], attention_mask[row, :pad] = PAD, 0
            length = int(torch.randint(1, completion_len + 1, (1,), generator=g))
            completion_mask[row, prompt_len:prompt_len + length] = 1
            input_ids[row, prompt_len + length:], attention_mask[row, prompt_len + length:] = PAD, 0
            is_eos[row] = length < completion_len
    with torch.no_grad():
        behaviour = token_logps(model, input_ids, attention_mask, temperature) * completion_mask[:, 1:]
    return Rollout(
        rows=[{"prompt": f"prompt {p}"} for p in range(num_prompts)],
        prompts=[f"prompt {p}" for p in range(num_prompts)],
        completions=[f"completion {i}" for i in range(N)],
        input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
        behaviour_token_logps=behaviour, is_eos=is_eos, num_generations=K,
    )


def shell_rollout(num_prompts: int, K: int, behaviour_token_logps: torch.Tensor | None = None,
                  completion_mask: torch.Tensor | None = None) -> Rollout:
    """A Rollout without a model, for hand-computed cases: every token is a completion token unless
    ``completion_mask`` says otherwise (shape (N, T+1) where behaviour is (N, T))."""
    N = num_prompts * K
    if behaviour_token_logps is None:
        behaviour_token_logps = torch.zeros(N, 1)
    T = behaviour_token_logps.shape[1]
    if completion_mask is None:
        completion_mask = torch.cat([torch.zeros(N, 1, dtype=torch.long), torch.ones(N, T, dtype=torch.long)], 1)
    return Rollout(
        rows=[{"prompt": str(p)} for p in range(num_prompts)], prompts=[str(p) for p in range(num_prompts)],
        completions=[""] * N, input_ids=torch.full((N, T + 1), 5), attention_mask=torch.ones(N, T + 1, dtype=torch.long),
        completion_mask=completion_mask, behaviour_token_logps=behaviour_token_logps,
        is_eos=torch.ones(N, dtype=torch.bool), num_generations=K,
    )


def score_feedback(rewards, valid=None) -> Feedback:
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    valid = None if valid is None else torch.as_tensor(valid, dtype=torch.bool)
    return Feedback(num_annotations=rewards.numel(), rewards=rewards, valid=valid)


def compare_feedback(pairs, preference) -> Feedback:
    return Feedback(num_annotations=len(pairs), pairs=list(pairs), preference=torch.tensor(preference, dtype=torch.float32))


def reference_token_logps(ref_model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        return token_logps(ref_model, rollout.input_ids, rollout.attention_mask, temperature) * rollout.completion_mask[:, 1:]


def run_step(objective, model, rollout: Rollout, feedback: Feedback, ref_token_logps=None, prompts_per_micro_batch=None):
    """prepare + compute_loss per micro-batch (scaled by n/N) + backward. Returns (total loss,
    prepared, prepare metrics, the LossOutput of each micro-batch)."""
    with torch.no_grad():
        prepared, metrics = objective.prepare(rollout, feedback, ref_token_logps, model)
    K, P = rollout.num_generations, rollout.num_prompts
    N = P * K
    full = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
            "completion_mask": rollout.completion_mask, **prepared}
    for name, value in full.items():
        assert value.shape[0] == N, f"prepared[{name!r}] has first dim {value.shape[0]}, expected N={N}"
    step = prompts_per_micro_batch or P
    total, loss_metrics = 0.0, []
    for start in range(0, P, step):
        rows = slice(start * K, min(P, start + step) * K)
        micro = {name: value[rows] for name, value in full.items()}
        n = micro["input_ids"].shape[0]
        out = objective.compute_loss(model, micro)
        loss = out.loss
        assert loss.dim() == 0 and torch.isfinite(loss), f"loss {loss}"
        (loss * n / N).backward()
        total += loss.item() * n / N
        loss_metrics.append(out)  # LossOutput: .metrics, .pi_t_token_logps
    return total, prepared, metrics, loss_metrics


def grads(*modules) -> torch.Tensor:
    """All gradients, flattened (zeros where a parameter got none)."""
    return torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        for module in modules for p in module.parameters()
    ])


def zero_grads(*modules) -> None:
    for module in modules:
        for p in module.parameters():
            p.grad = None
