"""One process of ``test_sharding.py``'s two-process FSDP2 run (torchrun + gloo on CPU): the tiny
policy sharded with torch's ``fully_shard`` per decoder layer and at the root, as accelerate's
FSDP2 plugin wraps it on GPUs.

    python -m torch.distributed.run --nproc_per_node 2 tests/sharding_worker.py POLICY_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from daralign.core import sharding
from daralign.core.models import load_causal_lm, load_tokenizer, token_logps
from daralign.rollout.hf import sample_rollout
from daralign.rollout.vllm_colocate import merged_weights
from daralign.train import outputs


def main(folder: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    plain, model, tok = load_causal_lm(folder), load_causal_lm(folder), load_tokenizer(folder)
    expect = plain.state_dict()
    assert not sharding.is_sharded(model) and not sharding.in_lockstep(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert sharding.is_sharded(model) and sharding.in_lockstep(model)
    local = next(model.parameters()).to_local()
    assert local.numel() < next(plain.parameters()).numel(), "each process holds a shard only"

    # the whole weights, one tensor at a time in state-dict order: what a weight push reads
    got = list(sharding.whole_state(model))
    assert [k for k, _ in got] == list(expect), "the state dict's keys and order"
    for k, v in got:
        assert torch.equal(v, expect[k]), k
    with merged_weights(model) as weights:  # shards, gathered where a push uses them
        pushed = {k: sharding.whole(v) for k, v in weights}
    assert pushed.keys() == expect.keys() and all(torch.equal(pushed[k], expect[k]) for k in expect)

    # generation in lockstep: the ranks ask for answers of different lengths, so one finishes while
    # the other still needs its layers gathered (without synced_gpus this hangs)
    rows = [{"prompt": p} for p in ("Write a poem about the sea.", "What is a good breakfast?")]
    torch.manual_seed(rank)
    rollout = sample_rollout(model, tok, rows, num_generations=2, max_completion_length=4 + 12 * rank)
    with torch.no_grad():  # the recorded π_t is the unsharded model's distribution over the same tokens
        ref = token_logps(plain, rollout.input_ids, rollout.attention_mask, completion_mask=rollout.completion_mask)
    mask = rollout.completion_mask[:, 1:].bool()
    assert torch.allclose(rollout.behaviour_token_logps[mask], ref[mask], atol=1e-4)

    # final/: gathered on every process, written by the main one
    state = sharding.whole_state_dict(model, keep=rank == 0)
    assert (state is None) == (rank != 0)
    if rank == 0:
        outputs.save_final(out, model, tok, {}, merge_lora=False, state_dict=state)
        back = load_causal_lm(str(out / "final")).state_dict()
        assert back.keys() == expect.keys() and all(torch.equal(back[k], expect[k]) for k in expect)
    dist.barrier()
    print(f"rank {rank}: sharded weights, lockstep generation and final/ ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
