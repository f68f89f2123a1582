"""What a weight push (and a merged ``final/``) reads of the policy, on one CPU process: names that
load into the plain model — under activation checkpointing (torch's ``checkpoint_wrapper``, as
FSDP2 users apply it, and transformers' own), with a compiled submodule, with PEFT's
``modules_to_save`` — and LoRA merged out of place: the base weights, which are also the frozen
reference, never written (huggingface/trl#6688: a bf16 merge/unmerge round trip drifts)."""

from __future__ import annotations

import copy

import pytest
import torch

from daralign.core.errors import ConfigError
from daralign.core.models import load_causal_lm
from daralign.core.sharding import Merged, merged_weights, push_weights, whole

Q = "model.layers.0.self_attn.q_proj.weight"


def pushed(model) -> dict[str, torch.Tensor]:
    """What a push sends: every tensor made whole, in order, by its plain name."""
    with merged_weights(model) as weights:
        names = [k for k, _ in weights]
        out = {k: whole(v).clone() for k, v in weights}
    assert len(names) == len(out), "each name once"
    return out


def loads_into_plain_model(model, folder) -> torch.nn.Module:
    """The pushed tensors loaded strictly into a fresh model of the same config."""
    fresh = load_causal_lm(folder)
    fresh.load_state_dict(pushed(model), strict=True)
    return fresh


def lora(folder, *, dtype=torch.float32, seed=0, **config):
    """A LoRA policy whose adapter is not zero (B starts at zero: give it a delta)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(folder).to(dtype),
                           LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_activation_checkpointing_names_load_into_the_plain_model(tiny_policy_dir):
    """torch's checkpoint_wrapper on every decoder layer (FSDP2's way: accelerate's
    fsdp_activation_checkpointing), transformers' gradient checkpointing, and a submodule compiled in
    place (torch.compile's OptimizedModule): the push's names are the plain model's."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing, checkpoint_wrapper)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    folder = str(tiny_policy_dir)
    plain = load_causal_lm(folder).state_dict()
    wrapped = load_causal_lm(folder)
    apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_modules())
    hf = load_causal_lm(folder)
    hf.gradient_checkpointing_enable()
    compiled = load_causal_lm(folder)
    compiled.model.layers[1] = torch.compile(compiled.model.layers[1])  # compiles at its first call: never here
    assert any("_orig_mod" in k for k in compiled.state_dict())
    for model in (wrapped, hf, compiled):
        fresh = loads_into_plain_model(model, folder)
        assert all(torch.equal(v, plain[k]) for k, v in fresh.state_dict().items())


def test_lora_with_modules_to_save_under_activation_checkpointing_pushes_plain_names(tiny_policy_dir):
    """PEFT's modules_to_save keeps the original beside a trained copy per adapter: the push sends
    the active copy under the module's own name and never the original; LoRA layers inside
    checkpoint-wrapped decoder layers are merged under their plain names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing, checkpoint_wrapper)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    folder = str(tiny_policy_dir)
    model = lora(folder, modules_to_save=["lm_head"])
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    with torch.no_grad():  # the trained copy moves away from the original
        model.get_base_model().lm_head.modules_to_save["default"].weight.add_(1.0)
    keys = list(model.get_base_model().state_dict())
    assert any("modules_to_save.default" in k for k in keys) and any("original_module" in k for k in keys)
    fresh = loads_into_plain_model(model, folder)
    want = copy.deepcopy(model).merge_and_unload().state_dict()  # PEFT's own merge, on a copy
    assert fresh.state_dict().keys() == want.keys()
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)
    torch.testing.assert_close(fresh.lm_head.weight, load_causal_lm(folder).lm_head.weight + 1.0)  # the trained copy


def test_lora_merged_push_never_writes_the_bf16_base(tiny_policy_dir):
    """100 merged pushes of a bf16 LoRA policy: the base weights (the frozen reference too) are
    bit-identical after them, and each push equals PEFT's own merge (merge_and_unload on a copy)."""
    model = lora(str(tiny_policy_dir), dtype=torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    assert want[Q].dtype == torch.bfloat16
    first = None
    for _ in range(100):
        got = pushed(model)
        first = first or got
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k  # bit for bit
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], first[k]), k
        torch.testing.assert_close(got[k], want[k], msg=k)  # bf16's tolerance (one rounding apart at most)
    assert not torch.equal(got[Q], base["base_model.model." + Q.replace(".weight", ".base_layer.weight")])  # merged


def test_a_merged_weight_is_computed_when_used_one_layer_at_a_time(tiny_policy_dir):
    """The push's list holds a LoRA layer's merge as a recipe (dtype and shape without computing it,
    which a transfer's metadata reads), made into a fresh tensor only by ``whole``: a push holds one
    merged layer at a time, never a merged copy of the model; a plain weight is the tensor itself."""
    model = lora(str(tiny_policy_dir))
    weights = dict(push_weights(model))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(weights[Q], Merged) and weights[Q].dtype == torch.float32
    from daralign.core.sharding import whole_shape

    assert whole_shape(weights[Q]) == tuple(layer.base_layer.weight.shape)
    a, b = whole(weights[Q]), whole(weights[Q])
    assert a.data_ptr() not in (b.data_ptr(), layer.base_layer.weight.data_ptr())
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(a, layer.base_layer.weight + delta)
    k = "model.layers.0.mlp.up_proj.weight"  # not a LoRA target: the weight itself
    assert weights[k].data_ptr() == model.get_base_model().model.layers[0].mlp.up_proj.weight.data_ptr()
    with model.disable_adapter():  # the adapter off (the reference's forward): nothing merged
        assert torch.equal(whole(push_weights(model)[0][1]), model.get_base_model().model.embed_tokens.weight)
        off = dict(push_weights(model))
        assert not isinstance(off[Q], Merged) and torch.equal(whole(off[Q]), layer.base_layer.weight)


@pytest.mark.parametrize("variant", ["dora", "lora_bias", "embedding"])
def test_lora_variants_merge_out_of_place_as_peft_does(tiny_policy_dir, variant):
    """DoRA (PEFT's own out-of-place merge), a LoRA bias and LoRA on the embedding (its factors are
    ``lora_embedding_A/B``): what PEFT's merge gives, base untouched."""
    if variant == "dora":
        model = lora(str(tiny_policy_dir), use_dora=True)
    elif variant == "embedding":
        model = lora(str(tiny_policy_dir), target_modules=["embed_tokens", "q_proj"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_embedding_" in name:  # PEFT starts an embedding's A at zero
                    p.add_(torch.randn_like(p) * 0.1)
    else:  # the tiny Llama's projections have no bias: give o_proj one
        from peft import LoraConfig, get_peft_model

        base_model = load_causal_lm(str(tiny_policy_dir))
        for layer in base_model.model.layers:
            proj = layer.self_attn.o_proj
            layer.self_attn.o_proj = torch.nn.Linear(proj.in_features, proj.out_features, bias=True)
        model = get_peft_model(base_model, LoraConfig(r=4, target_modules=["o_proj"], lora_bias=True))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    assert any(not torch.equal(want[k.replace("base_model.model.", "").replace("base_layer.", "")], v)
               for k, v in base.items() if "base_layer" in k)  # the adapter does change a weight
    got = pushed(model)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_other_peft_layers_are_refused_in_one_line(tiny_policy_dir):
    from peft import IA3Config, get_peft_model

    model = get_peft_model(load_causal_lm(str(tiny_policy_dir)),
                           IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ConfigError, match=r"peft\.tuners\.ia3\..* LoRA layers and modules_to_save only"):
        push_weights(model)


def test_a_sharded_final_of_a_lora_policy_is_merged_out_of_place(tiny_policy_dir, monkeypatch):
    """final_state (the merged final/ of a sharded LoRA policy) reads the same push: as a sharded model
    (is_sharded forced here; test_sharding.py runs it under ZeRO-3) its merged weights are PEFT's."""
    from daralign.core import sharding

    model = lora(str(tiny_policy_dir), modules_to_save=["lm_head"])
    monkeypatch.setattr(sharding, "is_sharded", lambda model: True)
    state = sharding.final_state(model, keep=True, merge_lora=True)
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    assert state.keys() == want.keys()
    assert all(torch.allclose(state[k], want[k], atol=1e-6) for k in want)
    assert sharding.final_state(model, keep=False, merge_lora=True) is None


def test_a_server_transfer_reads_merged_weights_lazily(tiny_policy_dir):
    """vLLM's weight transfer (rollout/vllm_transfer.py) reads the push's metadata first — dtype and
    whole shape, without computing a merge — then the tensors one at a time, merged as PEFT merges."""
    pytest.importorskip("vllm")
    from daralign.rollout.vllm_transfer import PushedWeights

    model = lora(str(tiny_policy_dir), modules_to_save=["lm_head"])
    source = PushedWeights(push_weights(model))
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    assert [(m.name, tuple(m.shape), m.dtype) for m in source.metadata()] == [
        (k, tuple(v.shape), v.dtype) for k, v in want.items()]
    for name, t in source:
        torch.testing.assert_close(t, want[name], rtol=0, atol=1e-6, msg=name)
