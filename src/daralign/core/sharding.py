"""Whole weights out of a sharded policy, for the places that need the whole model (the weight push
to vLLM, the ``final/`` save), and the frozen reference sharded like the policy.

Two ways a parameter is sharded, both under ``accelerate launch``:

- **FSDP2** (``fsdp_version: 2``, or torch's ``fully_shard``): every parameter is a ``DTensor``
  holding this process's shard; ``full_tensor()`` all-gathers it.
- **DeepSpeed ZeRO-3**: every parameter is a placeholder with a ``ds_id``; its shard lives in
  ``ds_tensor`` and ``deepspeed.zero.GatheredParameters`` gathers it for the block.

Gathering is collective: **every process must walk the weights in the same order**, even where
only the main process uses them (the server push, the save). Walking one tensor at a time keeps a
single gathered parameter beside the shards, never a second whole model (verl and TRL push the
same way). HF generation runs in lockstep (``synced_gpus``): a process whose answers all ended
keeps taking part in the others' forward passes, each of which gathers every layer.

The held-out check runs on every process alike (the same answers, sampled in lockstep, and the
KL through the sharded reference); the main process writes it.

Refused in one line before any model loads (``check_launch``): a LoRA policy under FSDP (under
ZeRO-3 its merge gathers every parameter: ``merged_weights``), and under DeepSpeed an objective
that trains modules beside the policy (PPO's value head) or DeepSpeed's own gradient accumulation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from daralign.core.errors import ConfigError


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def _is_zero3(t: torch.Tensor) -> bool:
    return hasattr(t, "ds_id")  # DeepSpeed marks every parameter it partitions


def is_sharded(model) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (``DTensor``) or ZeRO-3 partitions."""
    DTensor = _dtensor_type()
    return any((DTensor is not None and isinstance(p, DTensor)) or _is_zero3(p) for p in model.parameters())


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, or — a shard — the whole tensor gathered from every process (collective)."""
    DTensor = _dtensor_type()
    if DTensor is not None and isinstance(t, DTensor):
        return t.full_tensor().detach()
    if _is_zero3(t):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):  # gathered for the block, partitioned again after it
            return t.data.detach().clone()
    return t.detach()


def whole_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape, without gathering it (a ZeRO-3 placeholder is empty)."""
    return tuple(t.ds_shape) if _is_zero3(t) else tuple(t.shape)


def whole_state(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, whole tensor) one at a time: lazily, so a consumer that loads each tensor as
    it comes (vLLM's ``load_weights``) never holds more than one gathered parameter."""
    for k, v in model.state_dict(keep_vars=True).items():  # the parameters themselves: ZeRO-3 gathers those
        yield k, whole(v)


def whole_state_dict(model, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """The whole state dict on CPU where ``keep`` (the process that saves), None elsewhere; every
    process must call it (the gather is collective)."""
    out = {}
    for k, v in whole_state(model):
        if keep:
            out[k] = v.to("cpu", copy=True)
    return out if keep else None


@contextmanager
def merged_weights(model):
    """(HF name, tensor) of the policy as a plain causal LM — what a vLLM push and a merged
    ``final/`` hold — valid inside the block, each tied weight once (under its first name: vLLM ties
    the head to the embedding itself). The tensors may be shards (FSDP2) or placeholders (ZeRO-3):
    gather each with ``whole`` where it is used, on every process in the same order.

    A PEFT model's LoRA deltas are merged into its base weights in place for the block and taken out
    after it, so a push reads the weights themselves and never needs a copy of the model. Under
    ZeRO-3 the merge needs every factor whole: all parameters are gathered for the block (as TRL
    does for LoRA under ZeRO-3; a LoRA base model fits each GPU) and the tensors given are whole."""
    peft = hasattr(model, "merge_adapter") and hasattr(model, "get_base_model")
    base = model.get_base_model() if peft else model
    all_names = {name for name, _ in base.named_parameters(remove_duplicate=False)}
    aliases = all_names - {name for name, _ in base.named_parameters()}  # the later names of a shared tensor

    def pairs(gathered: bool):  # the parameters themselves (keep_vars): a placeholder is gathered from its parameter
        return [(k.replace(".base_layer", ""), v.data if gathered else v) for k, v in base.state_dict(keep_vars=True).items()
                if "lora_" not in k and k not in aliases]

    if not peft:
        yield pairs(False)
        return
    zero3 = any(_is_zero3(p) for p in model.parameters())
    with gathered(model):
        model.merge_adapter()
        try:
            yield pairs(zero3)
        finally:
            model.unmerge_adapter()


def gathered(model):
    """Under ZeRO-3, every parameter of ``model`` whole for the block (collective; changes are not
    kept); else nothing to do."""
    if not any(_is_zero3(p) for p in model.parameters()):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def final_state(model, *, keep: bool, merge_lora: bool) -> dict[str, torch.Tensor] | None:
    """What ``final/`` saves of a sharded policy, gathered on every process (collective) and kept on
    CPU where ``keep``: the merged plain weights of a LoRA policy when ``merge_lora``, else its whole
    state dict. None for an unsharded policy, which saves itself."""
    if not is_sharded(model):
        return None
    if not (merge_lora and hasattr(model, "merge_adapter")):
        return whole_state_dict(model, keep)
    with merged_weights(model) as weights:
        state = {k: whole(v).to("cpu", copy=True) for k, v in weights}
    return state if keep else None


def in_lockstep(model) -> bool:
    """Whether generation must run in lockstep over processes (``generate(synced_gpus=True)``)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and is_sharded(model)


def check_launch(accelerator, *, use_peft: bool, extra_modules: bool = False,
                 micro_batch: int = 1, max_grad_norm: float = 1.0) -> None:
    """One line, on every process alike and before any model loads, for what is not built; under
    DeepSpeed, the config values accelerate would otherwise take from a dataloader we do not give it."""
    state = accelerator.state
    deepspeed = getattr(state, "deepspeed_plugin", None)
    fsdp = getattr(state, "fsdp_plugin", None)
    if deepspeed is None and fsdp is None:
        return
    if use_peft and deepspeed is None:
        raise ConfigError("FSDP with LoRA (use_peft) is not built yet: a LoRA policy's base model is frozen and fits "
                          "each GPU, so launch it with DDP or DeepSpeed (docs/gpu.md)")
    if deepspeed is None:
        return
    if extra_modules:
        raise ConfigError("DeepSpeed with an objective that trains a module beside the policy (ppo's value head) is not "
                          "built yet: its parameters are not DeepSpeed's; use FSDP2 or DDP (docs/gpu.md)")
    config = deepspeed.deepspeed_config
    if config.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise ConfigError("DeepSpeed config: gradient_accumulation_steps must be 1 or auto; set daralign's "
                          "gradient_accumulation_steps instead (daralign marks the accumulation boundary itself)")
    config["gradient_accumulation_steps"] = 1
    if deepspeed.is_auto("train_micro_batch_size_per_gpu"):
        config["train_micro_batch_size_per_gpu"] = micro_batch  # bookkeeping only: the loop cuts its own micro-batches
    config.pop("train_batch_size", None)  # DeepSpeed derives it: micro-batch × 1 × processes
    if config.get("gradient_clipping", "auto") == "auto":  # DeepSpeed clips inside its step
        config["gradient_clipping"] = max(max_grad_norm, 0.0)


def place_reference(model, accelerator):
    """The frozen reference, sharded like the policy where the policy is (TRL's ``prepare_deepspeed`` /
    ``prepare_fsdp``): under ZeRO-3 a DeepSpeed engine without an optimizer, under FSDP2
    ``fully_shard`` per decoder layer and at the root; else the whole model on the device."""
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:
        import deepspeed

        config = {k: v for k, v in copy.deepcopy(deepspeed_plugin.deepspeed_config).items() if k not in ("optimizer", "scheduler")}
        zero, hidden = config.setdefault("zero_optimization", {}), model.config.hidden_size
        for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):  # accelerate's fill for the policy
            if zero.get(key) == "auto":
                zero[key] = value
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeed's eval() returns nothing
        return engine
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return shard_frozen(model.to(accelerator.device))
    return model.to(accelerator.device)


def shard_frozen(model):
    """A frozen model sharded with FSDP2 as accelerate shards the policy: each decoder layer
    (``_no_split_modules``) and the root; its forward gathers a layer at a time."""
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(model)
    return model
