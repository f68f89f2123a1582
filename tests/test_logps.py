"""Sequence log-probs and the HF rollout on a tiny random Llama loaded from a save_pretrained folder:
prompt and padding masked, left padding handled, EOS counted once, batched == one at a time,
behaviour log-probs == a fresh forward, completion_mask stops right after the first EOS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny
from daralign.core.models import load_causal_lm, load_tokenizer, sequence_logps, token_logps
from daralign.rollout.hf import sample_rollout

ROWS = [{"prompt": p} for p in tiny.PROMPTS]


def manual_logp(model, ids: list[int], completion_start: int) -> float:
    """log π(y|x) for ONE unpadded sequence ids = prompt + completion, the completion starting at
    ``completion_start``: a plain forward (default positions) and a Python sum."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = F.log_softmax(logits, -1)
    return sum(lp[t - 1, ids[t]].item() for t in range(completion_start, len(ids)))


def layout(rows: list[tuple[list[int], list[int]]], pad: int, prompt_width: int | None = None):
    """Left-padded prompts + right-padded completions, as the rollout lays them out."""
    Lp = prompt_width or max(len(p) for p, _ in rows)
    Lc = max(len(c) for _, c in rows)
    ids, att, comp = [], [], []
    for p, c in rows:
        lp, rc = Lp - len(p), Lc - len(c)
        ids.append([pad] * lp + p + c + [pad] * rc)
        att.append([0] * lp + [1] * (len(p) + len(c)) + [0] * rc)
        comp.append([0] * Lp + [1] * len(c) + [0] * rc)
    return torch.tensor(ids), torch.tensor(att), torch.tensor(comp)


@pytest.fixture(scope="module")
def model_tok(tiny_policy_dir):
    model = load_causal_lm(str(tiny_policy_dir))
    model.eval()
    return model, load_tokenizer(str(tiny_policy_dir))


def _sequences(tok):
    eos = tok.eos_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [
        (enc("What is a good breakfast?"), enc(" Eggs and toast.") + [eos]),
        (enc("Hi"), enc(" Paris is the capital of France") + [eos]),
        (enc("Describe a walk in the park on a sunny day."), enc(" ocean")),  # cut by length: no EOS
        (enc("Explain gravity."), [eos]),  # empty answer: just EOS
    ]


def test_batched_equals_one_sequence_at_a_time(model_tok):
    model, tok = model_tok
    seqs = _sequences(tok)
    ids, att, comp = layout(seqs, tok.pad_token_id)
    assert (att[:, 0] == 0).any() and (att[:, -1] == 0).any()  # both left and right padding present
    batched = sequence_logps(model, ids, att, comp)
    for i, (p, c) in enumerate(seqs):
        alone = manual_logp(model, p + c, len(p))
        assert batched[i].item() == pytest.approx(alone, abs=1e-4, rel=1e-5)
    # and the per-sequence sum is finite, negative, and counts only completion tokens
    assert torch.isfinite(batched).all() and (batched < 0).all()


def test_padding_and_prompt_are_masked(model_tok):
    model, tok = model_tok
    seqs = _sequences(tok)
    ids, att, comp = layout(seqs, tok.pad_token_id)
    base = sequence_logps(model, ids, att, comp)
    # changing padded token ids (masked by attention and completion masks) changes nothing
    ids2 = torch.where(att.bool(), ids, torch.full_like(ids, 7))
    assert torch.allclose(sequence_logps(model, ids2, att, comp), base, atol=1e-5)
    # token-level: zero outside the completion once masked
    per_tok = token_logps(model, ids, att) * comp[:, 1:]
    assert (per_tok[comp[:, 1:] == 0] == 0).all()
    assert torch.allclose(per_tok.sum(-1), base, atol=1e-5)
    # masking the prompt matters: counting it would change the value
    with_prompt = sequence_logps(model, ids, att, att)
    assert (with_prompt < base - 1e-3).all()


@pytest.mark.parametrize("extra_left_pad", [0, 1, 5])
def test_left_padding_does_not_shift_positions(model_tok, extra_left_pad):
    model, tok = model_tok
    seqs = _sequences(tok)
    width = max(len(p) for p, _ in seqs) + extra_left_pad
    ids, att, comp = layout(seqs, tok.pad_token_id, prompt_width=width)
    out = sequence_logps(model, ids, att, comp)
    for i, (p, c) in enumerate(seqs):
        assert out[i].item() == pytest.approx(manual_logp(model, p + c, len(p)), abs=1e-4, rel=1e-5)


def test_eos_counted_once_when_pad_is_eos(tmp_path):
    """A tokenizer without a pad token gets pad = EOS (load_tokenizer); the EOS that ends the answer
    is counted once and the EOS-valued padding after it never."""
    tok = tiny.build_tokenizer(pad=None)
    model = tiny.build_causal_lm(tok, eos_boost=0.6)
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    model = load_causal_lm(str(tmp_path)).eval()
    assert tok.pad_token_id == tok.eos_token_id
    eos = tok.eos_token_id
    p = tok("Tell me about the ocean.", add_special_tokens=False)["input_ids"]
    short = tok(" Hi", add_special_tokens=False)["input_ids"] + [eos]
    long = tok(" Eggs and toast and more", add_special_tokens=False)["input_ids"] + [eos]
    ids, att, comp = layout([(p, short), (p, long)], pad=eos)
    assert (ids[0] == eos).sum() > 1  # the short row's padding is EOS too
    out = sequence_logps(model, ids, att, comp)
    assert out[0].item() == pytest.approx(manual_logp(model, p + short, len(p)), abs=1e-4)
    assert comp[0].sum().item() == len(short)  # exactly one EOS in the completion mask

    # and the rollout agrees: with pad == EOS, each completion ends at its first EOS
    torch.manual_seed(3)
    r = sample_rollout(model, tok, ROWS, num_generations=3, max_completion_length=10)
    _check_rollout_masks(r, tok, [eos], 10)
    assert r.is_eos.any()
    for i in range(r.input_ids.shape[0]):
        if r.is_eos[i]:
            assert (r.input_ids[i][r.completion_mask[i].bool()] == eos).sum() == 1


def _check_rollout_masks(r, tok, eos_ids, max_len):
    N, L = r.input_ids.shape
    Lp = L - max_len
    gen = r.input_ids[:, Lp:]
    gen_mask = r.completion_mask[:, Lp:]
    assert (r.completion_mask[:, :Lp] == 0).all()  # prompt never in the completion
    assert (r.attention_mask[:, Lp:] == gen_mask).all()  # padding after the answer not attended
    for i in range(N):
        toks = gen[i].tolist()
        is_e = [t in eos_ids for t in toks]
        n = int(gen_mask[i].sum())
        if r.is_eos[i]:
            first = is_e.index(True)
            assert n == first + 1, "completion must stop right after the first EOS"
        else:
            assert not any(is_e[:n]) and n == max_len  # cut by the length limit
        assert gen_mask[i, :n].all() and not gen_mask[i, n:].any()  # contiguous from the start
        assert (gen[i, n:] == tok.pad_token_id).all()
        assert n >= 1
    # behaviour log-probs are zero off the completion
    assert (r.behaviour_token_logps[r.completion_mask[:, 1:] == 0] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_behaviour_logps_equal_a_fresh_forward(model_tok, temperature):
    model, tok = model_tok
    torch.manual_seed(0)
    K, T = 3, 5
    r = sample_rollout(model, tok, ROWS, num_generations=K, max_completion_length=T, temperature=temperature,
                       generation_batch_size=7)  # uneven generate() batches
    N = len(ROWS) * K
    assert r.input_ids.shape[0] == N and len(r.completions) == N and r.num_prompts == len(ROWS)
    assert r.is_eos.any()
    if temperature == 1.0:
        assert (~r.is_eos).any()  # both endings occur with the EOS-boosted tiny model
    _check_rollout_masks(r, tok, [tok.eos_token_id], T)
    fresh = token_logps(model, r.input_ids, r.attention_mask, temperature) * r.completion_mask[:, 1:]
    assert torch.allclose(r.behaviour_token_logps, fresh, atol=2e-4)
    assert torch.allclose(r.behaviour_logps, sequence_logps(model, r.input_ids, r.attention_mask,
                                                            r.completion_mask, temperature), atol=1e-3)
    # prompt-major order: the K samples of a prompt share its (left-padded) prompt tokens
    Lp = r.input_ids.shape[1] - T
    for p in range(len(ROWS)):
        block = r.input_ids[p * K:(p + 1) * K, :Lp]
        assert (block == block[0]).all()
    # texts are the decoded completion tokens, special tokens stripped
    for i in range(N):
        toks = r.input_ids[i][r.completion_mask[i].bool()]
        assert r.completions[i] == tok.decode(toks, skip_special_tokens=True)


def test_rollout_renders_chat_template_and_restores_state(model_tok):
    model, tok = model_tok
    model.train()
    side = tok.padding_side
    torch.manual_seed(1)
    r = sample_rollout(model, tok, ROWS[:4], num_generations=1, max_completion_length=4)
    assert model.training and tok.padding_side == side
    Lp = r.input_ids.shape[1] - 4
    text = tok.decode(r.input_ids[3, :Lp][r.attention_mask[3, :Lp].bool()])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    model.eval()


def test_completion_only_logps_equal_the_full_forward(model_tok):
    """``token_logps(..., completion_mask)`` computes logits only from the first completion position
    (``logits_to_keep``): the same numbers on completion tokens as the full forward, 0 before."""
    model, tok = model_tok
    seqs = _sequences(tok)
    ids, att, comp = layout(seqs, tok.pad_token_id)
    full = token_logps(model, ids, att, 0.7)
    only = token_logps(model, ids, att, 0.7, comp)
    mask = comp[:, 1:].bool()
    assert torch.allclose(only[mask], full[mask], atol=1e-5)
    start = int(comp.any(0).nonzero()[0])
    assert (only[:, : start - 1] == 0).all() and only.shape == full.shape


def _grouped(tok, K: int = 3):
    """K different completions to each prompt, rows prompt-major as a rollout lays them out."""
    seqs = _sequences(tok)
    answers = [c for _, c in seqs]
    return [(p, answers[(i + j) % len(answers)]) for i, (p, _) in enumerate(seqs) for j in range(K)]


def test_shared_prompt_forward_equals_every_sequence_in_full(tiny_policy_dir):
    """``share_prompts``: each distinct prompt block runs once and its KV cache is gathered per row;
    the log-probs and the gradient equal running every sequence in full (float rounding only)."""
    model, tok = load_causal_lm(str(tiny_policy_dir)), load_tokenizer(str(tiny_policy_dir))
    model.train()
    ids, att, comp = layout(_grouped(tok), tok.pad_token_id)
    mask = comp[:, 1:].bool()
    results = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        lp = token_logps(model, ids, att, 0.7, comp, share_prompts=share)
        (lp * mask).sum().backward()
        results[share] = lp.detach(), [p.grad.clone() for p in model.parameters()]
    (full, g_full), (shared, g_shared) = results[False], results[True]
    assert torch.allclose(shared[mask], full[mask], atol=1e-5)
    start = int(comp.any(0).nonzero()[0])
    assert (shared[:, : start - 1] == 0).all() and shared.shape == full.shape
    for a, b in zip(g_full, g_shared):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # and a batch of distinct prompts (nothing to share) takes the full forward
    single = layout(_sequences(tok), tok.pad_token_id)
    assert torch.equal(token_logps(model, *single[:2], 0.7, single[2]),
                       token_logps(model, *single[:2], 0.7, single[2], share_prompts=False))


def test_shared_prompt_forward_falls_back_under_gradient_checkpointing(tiny_policy_dir):
    """Gradient checkpointing turns the model's cache off: the full forward is used, same numbers."""
    model, tok = load_causal_lm(str(tiny_policy_dir)), load_tokenizer(str(tiny_policy_dir))
    model.gradient_checkpointing_enable()
    model.train()
    ids, att, comp = layout(_grouped(tok), tok.pad_token_id)
    mask = comp[:, 1:].bool()
    a = token_logps(model, ids, att, 1.0, comp)
    b = token_logps(model, ids, att, 1.0, comp, share_prompts=False)
    assert torch.allclose(a[mask], b[mask], atol=1e-5)
