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

Names are the plain model's (``plain_name``, ``push_weights``): a push or a merged ``final/`` must
load into the model as ``from_pretrained`` builds it, so the parts wrappers and PEFT add to a
parameter's name are taken out, and a LoRA layer's weight is merged out of place (``Merged``).

Refused in one line before any model loads (``check_launch``): a LoRA policy under FSDP, and under
DeepSpeed an objective that trains modules beside the policy (PPO's value head), DeepSpeed's own
gradient accumulation and optimizer offload (DeepSpeed refuses a client optimizer with it).
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


def whole(t) -> torch.Tensor:
    """``t`` detached, or — a shard — the whole tensor gathered from every process (collective), or —
    a LoRA layer's ``Merged`` weight — its merge computed into a fresh tensor."""
    if isinstance(t, Merged):
        return t.compute()
    DTensor = _dtensor_type()
    if DTensor is not None and isinstance(t, DTensor):
        return t.full_tensor().detach()
    if _is_zero3(t):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):  # gathered for the block, partitioned again after it
            return t.data.detach().clone()
    return t.detach()


def whole_shape(t) -> tuple[int, ...]:
    """The whole tensor's shape, without gathering it (a ZeRO-3 placeholder is empty)."""
    if isinstance(t, Merged):
        return whole_shape(t.base)
    return tuple(t.ds_shape) if _is_zero3(t) else tuple(t.shape)


# What wrappers put into parameter names that the plain model's names lack: torch's checkpoint_wrapper
# (activation checkpointing: its state_dict() takes its own part out, its named_modules() keeps it) and
# torch.compile's OptimizedModule set in a submodule's place (accelerate's compile_regions).
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """``name`` as the unwrapped model spells it."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def whole_state(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, whole tensor) one at a time: lazily, so a consumer that loads each tensor as
    it comes (vLLM's ``load_weights``) never holds more than one gathered parameter."""
    for k, v in model.state_dict(keep_vars=True).items():  # the parameters themselves: ZeRO-3 gathers those
        yield plain_name(k), whole(v)


def whole_state_dict(model, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """The whole state dict on CPU where ``keep`` (the process that saves), None elsewhere; every
    process must call it (the gather is collective)."""
    out = {}
    for k, v in whole_state(model):
        if keep:
            out[k] = v.to("cpu", copy=True)
    return out if keep else None


class Merged:
    """A LoRA layer's weight (or bias) with its active adapters merged — W + scale·B·A, as PEFT's own
    merge computes it — made into a fresh tensor by ``whole``, one layer at a time. The base weight is
    never written: a merge and unmerge in place at every push drifts a bf16 base (huggingface/trl#6688),
    and with LoRA that base is also the frozen reference. Under ZeRO-3 the layer's parameters are
    gathered for the computation only (collective: every process computes it)."""

    def __init__(self, layer, attr: str, adapters: list[str]) -> None:
        self.layer, self.attr, self.adapters = layer, attr, adapters
        self.base = getattr(layer.get_base_layer(), attr)
        self.dtype = self.base.dtype

    @torch.no_grad()
    def compute(self) -> torch.Tensor:
        layer = self.layer
        with gathered(layer):
            out = base = self.base.data
            for a in self.adapters:
                if self.attr == "bias":
                    out = (out + layer.lora_B[a].bias * layer.scaling[a]).to(self.dtype)
                elif a in getattr(layer, "lora_variant", {}):  # DoRA and the like: PEFT's out-of-place merge
                    out = layer.lora_variant[a].merge_safe(layer, a, out)
                else:  # one rounding to the base's dtype, as PEFT's `weight.data += delta` rounds
                    out = (out + layer.get_delta_weight(a)).to(self.dtype)
            return out.clone() if out is base else out  # (no adapter to add: still never the base)


def push_weights(model) -> list[tuple[str, torch.Tensor | Merged]]:
    """(plain name, tensor) of ``model`` as a plain causal LM — what a vLLM push and a merged
    ``final/`` hold — each tied weight once (under its first name: vLLM ties the head to the embedding
    itself). The tensors may be shards (FSDP2), placeholders (ZeRO-3) or a LoRA layer's ``Merged``
    weight: make each whole with ``whole`` where it is used, on every process in the same order.

    A PEFT model: its base model's weights, a LoRA layer's base weight merged (``Merged``) and its
    factors left out; ``modules_to_save`` give the active adapter's trained copy under the module's
    own name, never the ``original_module`` beside it (TRL's vLLM push skips and renames the same)."""
    peft = hasattr(model, "merge_adapter") and hasattr(model, "get_base_model")
    base = model.get_base_model() if peft else model
    all_names = {plain_name(n) for n, _ in base.named_parameters(remove_duplicate=False)}
    aliases = all_names - {plain_name(n) for n, _ in base.named_parameters()}  # the later names of a shared tensor
    owners = _peft_owners(base) if peft else {}
    out = []
    for key, t in base.state_dict(keep_vars=True).items():
        name = plain_name(key)
        if name in aliases:
            continue
        prefix = next((p for p in _prefixes(name) if p in owners), None)
        if prefix is not None:
            name, t = _through_peft(owners[prefix], prefix, name[len(prefix):], t)
            if name is None:
                continue
        out.append((name, t))
    return out


def _prefixes(name: str) -> Iterator[str]:
    """``a.b.c.weight`` → ``a.b.c.``, ``a.b.``, ``a.``: the innermost module first."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i]) + "."


def _peft_owners(base) -> dict:
    """The PEFT layers and wrappers of ``base`` by their plain name prefix (``….q_proj.``); any other
    PEFT layer is refused in one line (its merge is not built here)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    owners = {}
    for name, m in base.named_modules():
        if isinstance(m, (LoraLayer, ModulesToSaveWrapper)):
            owners[plain_name(name + ".")] = m
        elif isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            raise ConfigError(f"{type(m).__module__}.{type(m).__name__} ({name}): a merged vLLM push or merged final/ "
                              "takes LoRA layers and modules_to_save only; use a LoraConfig, or merge_lora: false without vLLM")
    return owners


def _through_peft(m, prefix: str, rest: str, t):
    """The plain name and tensor of PEFT module ``m``'s state-dict entry ``prefix + rest``, or
    (None, None) for what a plain model has not (LoRA factors, the copy not in use)."""
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(m, ModulesToSaveWrapper):  # the module's original and one trained copy per adapter
        active = m.active_adapters[0] if m.active_adapters and not m.disable_adapters else None
        used = f"modules_to_save.{active}." if active in m.modules_to_save else "original_module."
        return (prefix + rest[len(used):], t) if rest.startswith(used) else (None, None)
    if not rest.startswith("base_layer."):
        return None, None  # lora_A, lora_B, DoRA's magnitude: the adapter's own
    attr = rest[len("base_layer."):]
    factors = {**m.lora_A, **getattr(m, "lora_embedding_A", {})}  # an embedding's adapter has factors of its own
    adapters = [] if m.disable_adapters else [a for a in m.active_adapters
                                              if a in factors and a not in m.merged_adapters]  # (merged: in the base)
    if attr == "bias":
        adapters = [a for a in adapters if getattr(m, "lora_bias", {}).get(a)]
    if adapters and attr in ("weight", "bias"):
        t = Merged(m, attr, adapters)
    return prefix + attr, t


@contextmanager
def merged_weights(model):
    """``push_weights(model)`` for the block (kept a block for its callers; nothing is written to
    the model, so nothing is undone after it)."""
    yield push_weights(model)


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
    state = {k: whole(v).to("cpu", copy=True) for k, v in push_weights(model)}
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
    offload = ((config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") or "none"
    if offload != "none" and config.get("zero_force_ds_cpu_optimizer", True):
        raise ConfigError(f"DeepSpeed offload_optimizer_device: {offload} is not built: DeepSpeed refuses daralign's "
                          "optimizer (torch's AdamW) with optimizer offload; set offload_optimizer_device: none in the "
                          "accelerate config (ZeRO-3 already shards Adam's state over the GPUs)")
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
        return shard_frozen(model)  # from the CPU: never the whole model on one GPU
    return model.to(accelerator.device)


def shard_frozen(model):
    """A frozen model sharded with FSDP2 as accelerate shards the policy: each decoder layer
    (``_no_split_modules``) and the root; its forward gathers a layer at a time. Give it the model on
    the CPU: ``fully_shard`` moves each group's parameters to its mesh's device and keeps this
    process's shard, so a GPU holds the shards and at most one group whole, never the whole model."""
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(model)
    return model
