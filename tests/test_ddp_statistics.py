"""Batch statistics under DDP are the global batch's: two real gloo processes on CPU, each with
half the prompts, get exactly the advantages, DAR weights and PPO whitening one process gets on
the whole batch. (The loop itself under torchrun: ``test_train_tiny.test_two_process_ddp_on_cpu``.)"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from daralign.objectives.dar import advantages, dar_log_weights
from daralign.objectives.ppo import masked_whiten

REWARDS = torch.tensor([[0.8, 0.1, 0.5], [0.9, 0.9, 0.2], [0.3, 0.7, 0.4], [0.0, 1.0, 0.6]])
VALID = torch.tensor([[True, True, False], [True, True, True], [True, False, True], [True, True, True]])
REF = torch.tensor([[-3.0, -4.0, -2.0], [-1.0, -2.0, -3.0], [-2.5, -1.5, -3.5], [-4.0, -2.0, -1.0]])
BEH = REF + torch.tensor([[0.1, -0.2, 0.0], [0.3, 0.0, -0.1], [0.2, 0.1, 0.0], [-0.3, 0.2, 0.1]])


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _statistics(rows: slice, reduce_sum) -> dict:
    r, v = REWARDS[rows], VALID[rows]
    out = {}
    for norm in ("batch", "group", "none"):
        out[f"adv_{norm}"] = advantages(r, norm, valid=v, reduce_sum=reduce_sum)
    out["adv_k1"] = advantages(r[:, :1], "batch", valid=v[:, :1], reduce_sum=reduce_sum)
    out["log_w"] = dar_log_weights(r, REF[rows], BEH[rows], alpha=0.005, beta=0.045, weight_clip=20.0,
                                   valid=v, reduce_sum=reduce_sum)
    out["whiten"] = masked_whiten(r.double(), v, reduce_sum=reduce_sum)
    return out


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = slice(2 * rank, 2 * rank + 2)
        queue.put((rank, {k: v.tolist() for k, v in _statistics(half, _all_reduce).items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
def test_two_processes_get_the_global_batch_statistics():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    whole = _statistics(slice(0, 4), lambda t: t)
    for key, value in whole.items():
        distributed = torch.tensor(results[0][key] + results[1][key], dtype=value.dtype)
        assert torch.allclose(distributed, value, atol=1e-10), key
    # and the local-batch statistics would have differed: the test can tell
    local = _statistics(slice(0, 2), lambda t: t)["adv_batch"]
    assert not torch.allclose(local, whole["adv_batch"][:2])


def test_k1_baseline_and_statistics_skip_invalid_labels():
    """The issue's example: rewards [0.8, 0.9, None, 0.7] at K = 1, no normalisation, α+β = 0.05:
    the baseline is the mean of the three valid rewards (0.8), so w = (1, e², e⁻²)."""
    from daralign.objectives.dar import dar_weights

    rewards = torch.tensor([[0.8], [0.9], [0.0], [0.7]])  # 0.0: the invalid label's placeholder
    valid = torch.tensor([[True], [True], [False], [True]])
    zeros = torch.zeros(4, 1)
    w = dar_weights(rewards, zeros, zeros, alpha=0.005, beta=0.045, advantage_normalization="none", valid=valid)
    assert w[valid].tolist() == pytest.approx([1.0, 7.389, 0.1353], rel=1e-3)
