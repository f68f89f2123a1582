"""One process of ``test_sharding.py``'s two-process runs (torchrun + gloo on CPU), the tiny policy
sharded as accelerate shards it on GPUs: ``fsdp2``, torch's ``fully_shard`` per decoder layer and
at the root; ``zero3``, DeepSpeed's ZeRO-3 engine (its CPU accelerator). The frozen reference is
sharded by daralign's own ``sharding.place_reference``.

    python -m torch.distributed.run --nproc_per_node 2 tests/sharding_worker.py fsdp2|zero3 POLICY_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from daralign.core import sharding
from daralign.core.models import load_causal_lm, load_tokenizer, token_logps
from daralign.rollout.hf import sample_rollout
from daralign.train.heldout import judge_heldout
from daralign.train import outputs


ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}


def shard(mode: str, model):
    """The policy as accelerate's FSDP2 plugin or its DeepSpeed ZeRO-3 integration leaves it."""
    if mode == "fsdp2":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5), config=ZERO3)
    return engine.module  # what accelerate's unwrap_model gives the loop


def launcher(mode: str):
    """What ``place_reference`` reads of accelerate's state under each launch."""
    if mode == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin

        return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2),
                                                     deepspeed_plugin=None), device=torch.device("cpu"))
    from accelerate.utils import DeepSpeedPlugin

    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=dict(ZERO3))),
                           device=torch.device("cpu"))


def one_optimizer_step_per_update(folder: str) -> None:
    """The loop's update under DeepSpeed: accelerate's ``backward`` with ``sync_gradients`` False on
    every micro-batch but the last (the loop sets it), so the engine accumulates and steps once. The
    result equals one AdamW step on the summed loss of the unsharded model."""
    import deepspeed
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    config = {**ZERO3, "gradient_clipping": 0.0}
    model, plain = load_causal_lm(folder), load_causal_lm(folder)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=config)
    batches = torch.randint(0, plain.config.vocab_size, (2, 2, 8), generator=torch.Generator().manual_seed(0))
    wrapped = DeepSpeedEngineWrapper(engine)
    for i, ids in enumerate(batches):
        wrapped.backward(engine(input_ids=ids, labels=ids).loss, sync_gradients=i == len(batches) - 1)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    sum(plain(input_ids=ids, labels=ids).loss for ids in batches).backward()
    optimizer.step()
    got, want = dict(sharding.whole_state(engine.module)), plain.state_dict()
    assert not torch.equal(want["lm_head.weight"], load_causal_lm(folder).state_dict()["lm_head.weight"])  # it moved
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=k)


def lora_merged_from_gathered_factors(folder: str) -> None:
    """A LoRA policy (and a trained lm_head copy: modules_to_save) under ZeRO-3: what a push (and a
    merged final/) reads is W + BA from factors gathered one layer at a time, by the plain model's
    names, as PEFT merges the unsharded model; the partitioned base weights are never written."""
    import deepspeed
    from peft import LoraConfig, get_peft_model

    def lora_model():
        torch.manual_seed(0)
        model = get_peft_model(load_causal_lm(folder), LoraConfig(r=4, target_modules=["q_proj"], lora_alpha=8,
                                                                  modules_to_save=["lm_head"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.1)  # B starts at zero: give the adapter a delta
            model.get_base_model().lm_head.modules_to_save["default"].weight.add_(1.0)  # the trained copy moved
        return model

    plain, model = lora_model(), lora_model()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3), config=ZERO3)
    want = plain.merge_and_unload().state_dict()  # PEFT's own merge of the unsharded model
    before = dict(sharding.whole_state(engine.module))
    for _ in range(2):
        with sharding.merged_weights(engine.module) as weights:
            got = {k: sharding.whole(v).clone() for k, v in weights}
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    assert not torch.allclose(want["model.layers.0.self_attn.q_proj.weight"],
                              load_causal_lm(folder).state_dict()["model.layers.0.self_attn.q_proj.weight"])  # merged
    after = dict(sharding.whole_state(engine.module))
    assert all(torch.equal(after[k], before[k]) for k in before), "the base is never written"
    state = sharding.final_state(engine.module, keep=dist.get_rank() == 0, merge_lora=True)  # a merged final/
    if dist.get_rank() == 0:
        assert state.keys() == want.keys() and all(torch.allclose(state[k], want[k], atol=1e-6) for k in want)


def main(mode: str, folder: str, out: Path) -> None:
    if mode == "zero3":
        import importlib

        import deepspeed

        backend = importlib.import_module("deepspeed.comm.torch")  # (the attribute deepspeed.comm.torch is torch itself)
        backend.build_shm_op = lambda: None  # its CPU all-reduce kernel compiles for ~50 s on 2 cores; gloo's suffices
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    plain, model, tok = load_causal_lm(folder), load_causal_lm(folder), load_tokenizer(folder)
    expect = plain.state_dict()
    assert not sharding.is_sharded(model) and not sharding.in_lockstep(model)
    model = shard(mode, model)
    assert sharding.is_sharded(model) and sharding.in_lockstep(model)
    first = next(model.parameters())
    local = first.to_local() if mode == "fsdp2" else first.ds_tensor
    assert local.numel() < next(plain.parameters()).numel(), "each process holds a shard only"
    assert sharding.whole_shape(first) == tuple(next(plain.parameters()).shape)

    # the whole weights, one tensor at a time in state-dict order: what a weight push reads
    got = list(sharding.whole_state(model))
    assert [k for k, _ in got] == list(expect), "the state dict's keys and order"
    for k, v in got:
        assert torch.equal(v, expect[k]), k
    with sharding.merged_weights(model) as weights:  # shards, gathered where a push uses them
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

    # the frozen reference, sharded like the policy: the same log-probs as the whole model's. Under
    # FSDP2 it is sharded from the CPU: never moved whole (Module.to) before its parameters are shards
    moves = []
    original_to = torch.nn.Module.to

    def recorded_to(module, *args, **kwargs):
        moves.append(sum(p.numel() for p in module.parameters() if not isinstance(p, DTensor)))
        return original_to(module, *args, **kwargs)

    torch.nn.Module.to = recorded_to
    try:
        reference = sharding.place_reference(load_causal_lm(folder).eval().requires_grad_(False), launcher(mode))
    finally:
        torch.nn.Module.to = original_to
    if mode == "fsdp2":
        assert not any(moves), f"a whole module moved before sharding: {moves} parameters"
        q, full = reference.model.layers[0].self_attn.q_proj.weight, plain.model.layers[0].self_attn.q_proj.weight
        assert q.to_local().numel() < full.numel() and tuple(q.shape) == tuple(full.shape)
    assert sharding.is_sharded(reference.module if mode == "zero3" else reference)
    with torch.no_grad():
        got = token_logps(reference, rollout.input_ids, rollout.attention_mask, completion_mask=rollout.completion_mask)
    assert torch.allclose(got[mask], ref[mask], atol=1e-4)

    # the held-out check runs on every process: sampling in lockstep and the KL through the sharded
    # reference give every process the whole model's answers and KL
    def heldout(policy, ref_model):
        kl_ref = lambda r: token_logps(ref_model, r.input_ids, r.attention_mask, completion_mask=r.completion_mask)  # noqa: E731
        with torch.no_grad():
            return judge_heldout(policy, tok, None, rows, max_new_tokens=4 + 8 * rank, temperature=1.0, seed=7,
                                 samples_per_prompt=2, ref_token_logps=kl_ref)
    sharded, whole_model = heldout(model, reference), heldout(plain, plain)
    assert sharded["completions"] == whole_model["completions"]
    assert abs(sharded["kl"] - whole_model["kl"]) < 1e-4

    # final/: gathered on every process, written by the main one
    state = sharding.whole_state_dict(model, keep=rank == 0)
    assert (state is None) == (rank != 0)
    if rank == 0:
        outputs.save_final(out, model, tok, {}, merge_lora=False, state_dict=state)
        back = load_causal_lm(str(out / "final")).state_dict()
        assert back.keys() == expect.keys() and all(torch.equal(back[k], expect[k]) for k in expect)
    dist.barrier()
    if mode == "zero3":
        one_optimizer_step_per_update(folder)
        lora_merged_from_gathered_factors(folder)
    print(f"rank {rank}: {mode}: sharded weights, lockstep generation, the sharded reference, the held-out check "
          "and final/ ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
