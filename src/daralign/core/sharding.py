"""Whole weights out of a sharded policy, for the places that need the whole model: the weight
push to vLLM and the ``final/`` save.

Under FSDP2 (``accelerate launch`` with ``fsdp_version: 2``, or torch's ``fully_shard``) every
parameter is a ``DTensor`` holding this process's shard, and ``full_tensor()`` all-gathers one of
them. Gathering is collective: **every process must walk the weights in the same order**, even
where only the main process uses them (the server push, the save). Walking one tensor at a time
keeps a single gathered parameter beside the shards, never a second whole model (verl and TRL
push the same way).

HF generation under FSDP2 runs in lockstep (``synced_gpus``): a process whose answers all ended
keeps taking part in the others' forward passes, each of which gathers every layer.

Refused in one line before any model loads (``check_launch``): DeepSpeed (its gather,
``deepspeed.zero.GatheredParameters``, generation under ZeRO-3 and its ``prepare()`` are not built),
and under FSDP2 a LoRA policy or a held-out set (the held-out check runs on the main process only).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from daralign.core.errors import ConfigError


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_sharded(model) -> bool:
    """Whether any parameter of ``model`` is an FSDP2 shard (a ``DTensor``)."""
    DTensor = _dtensor_type()
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or — a DTensor shard — the whole tensor gathered from every process (collective)."""
    DTensor = _dtensor_type()
    if DTensor is not None and isinstance(t, DTensor):
        return t.full_tensor()
    return t


def whole_state(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, whole tensor) one at a time, detached: lazily, so a consumer that loads each
    tensor as it comes (vLLM's ``load_weights``) never holds more than one gathered parameter."""
    for k, v in model.state_dict().items():
        yield k, whole(v.detach())


def whole_state_dict(model, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """The whole state dict on CPU where ``keep`` (the process that saves), None elsewhere; every
    process must call it (the gather is collective)."""
    out = {}
    for k, v in whole_state(model):
        if keep:
            out[k] = v.to("cpu", copy=True)
    return out if keep else None


def in_lockstep(model) -> bool:
    """Whether generation must run in lockstep over processes (``generate(synced_gpus=True)``)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and is_sharded(model)


def check_launch(accelerator, *, use_peft: bool, has_eval: bool) -> None:
    """One line, on every process alike and before any model loads, for what is not built."""
    state = accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        raise ConfigError("DeepSpeed is not supported yet (no ZeRO-3 gather for the weight push, the save or generation): "
                          "shard with FSDP2 (examples/accelerate/fsdp2.yaml) or use DDP (docs/gpu.md)")
    if getattr(state, "fsdp_plugin", None) is None:
        return
    if use_peft:
        raise ConfigError("FSDP with LoRA (use_peft) is not built yet: a LoRA policy's base model is frozen and fits each "
                          "GPU, so launch it with DDP (docs/gpu.md)")
    if has_eval:
        raise ConfigError("FSDP with an eval_dataset is not built yet (the held-out check runs on the main process only): "
                          "drop eval_dataset and evaluate final/ afterwards (`daralign eval`)")
