"""DAR's weights and loss against hand-computed values (plain Python ``math``, never the torch code
under test): w = min((π_ref/π_t)^{α/(α+β)} · exp(A/(α+β)), w_clip), A = r − mean_K(r) then
normalised; the special cases α→0, β→0, K=1; each normalisation; errors; the loss gradient."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from daralign.train.args import parse_train_args
from daralign.core.errors import ConfigError
from daralign.objectives.dar import DAR, DARConfig, advantages, dar_weights
from daralign.core.types import Feedback, Rollout

EPS = 1e-6  # the eps of (A − mean) / (std + eps)


# ---------------------------------------------------------------- plain-Python reference
def py_advantages(rewards: list[list[float]], normalization: str) -> list[list[float]]:
    P, K = len(rewards), len(rewards[0])
    if K == 1:
        base = sum(r[0] for r in rewards) / P  # K = 1: batch-mean baseline
        adv = [[r[0] - base] for r in rewards]
    else:
        adv = [[x - sum(r) / K for x in r] for r in rewards]  # A = r − V(x), V = MC mean
    if normalization == "batch":
        flat = [a for row in adv for a in row]
        m = sum(flat) / len(flat)
        sd = statistics.stdev(flat) if len(flat) > 1 else 0.0
        adv = [[(a - m) / (sd + EPS) for a in row] for row in adv]
    elif normalization == "group" and K > 1:
        adv = [[(a - sum(row) / K) / (statistics.stdev(row) + EPS) for a in row] for row in adv]
    return adv


def py_weights(rewards, ref, beh, alpha, beta, clip, normalization):
    adv = py_advantages(rewards, normalization)
    total = alpha + beta
    out = []
    for p in range(len(rewards)):
        row = []
        for k in range(len(rewards[0])):
            log_w = alpha / total * (ref[p][k] - beh[p][k]) + adv[p][k] / total
            row.append(math.exp(min(log_w, math.log(clip))))
        out.append(row)
    return out


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def close(actual: torch.Tensor, expected: list[list[float]], rel=1e-9, abs_=1e-12):
    assert list(actual.shape) == [len(expected), len(expected[0])]
    for a, e in zip(actual.reshape(-1).tolist(), [x for row in expected for x in row]):
        assert a == pytest.approx(e, rel=rel, abs=abs_)


REWARDS = [[1.0, 0.0, 0.5], [0.2, 0.9, 0.4], [3.0, 3.0, 2.0]]
REF = [[-10.0, -12.5, -8.0], [-5.0, -5.5, -7.0], [-20.0, -18.0, -19.0]]
BEH = [[-9.0, -13.0, -8.5], [-6.0, -5.0, -7.5], [-19.0, -18.5, -21.0]]


# ---------------------------------------------------------------- literal hand cases
def test_literal_two_samples_no_normalisation():
    # r = (1, 0): V = 0.5, A = (0.5, −0.5); α+β = 0.5 → log w = A/0.5 = (1, −1); π_ref = π_t.
    w = dar_weights(t([[1.0, 0.0]]), t([[-3.0, -4.0]]), t([[-3.0, -4.0]]), alpha=0.1, beta=0.4,
                    weight_clip=100.0, advantage_normalization="none")
    close(w, [[math.e, 1 / math.e]])
    # clip active on the first sample only: min(e, 2) = 2
    w = dar_weights(t([[1.0, 0.0]]), t([[-3.0, -4.0]]), t([[-3.0, -4.0]]), alpha=0.1, beta=0.4,
                    weight_clip=2.0, advantage_normalization="none")
    close(w, [[2.0, 1 / math.e]])
    # reference term: α/(α+β) = 0.2, log π_ref − log π_t = (+1, −2) → extra factors e^{0.2}, e^{−0.4}
    w = dar_weights(t([[1.0, 0.0]]), t([[-2.0, -6.0]]), t([[-3.0, -4.0]]), alpha=0.1, beta=0.4,
                    weight_clip=100.0, advantage_normalization="none")
    close(w, [[math.exp(0.2 + 1.0), math.exp(-0.4 - 1.0)]])


@pytest.mark.parametrize("normalization", ["batch", "group", "none"])
def test_advantages_each_normalisation(normalization):
    close(advantages(t(REWARDS), normalization), py_advantages(REWARDS, normalization), rel=1e-12, abs_=1e-12)


def test_batch_normalisation_hand_numbers():
    # r = [[2, 0], [1, 1]] → A = [[1, −1], [0, 0]]; mean 0, sample std sqrt(2/3)
    sd = math.sqrt(2 / 3)
    close(advantages(t([[2.0, 0.0], [1.0, 1.0]]), "batch"), [[1 / (sd + EPS), -1 / (sd + EPS)], [0.0, 0.0]])
    # group: per prompt; a constant group stays 0 (no division blow-up)
    g = advantages(t([[2.0, 0.0], [1.0, 1.0]]), "group")
    close(g, [[1 / (math.sqrt(2) + EPS), -1 / (math.sqrt(2) + EPS)], [0.0, 0.0]])


@pytest.mark.parametrize("normalization", ["batch", "group", "none"])
@pytest.mark.parametrize("clip", [1e6, 1.5], ids=["clip_inactive", "clip_active"])
def test_weights_match_hand_formula(normalization, clip):
    alpha, beta = 0.02, 0.03
    w = dar_weights(t(REWARDS), t(REF), t(BEH), alpha=alpha, beta=beta, weight_clip=clip,
                    advantage_normalization=normalization)
    expected = py_weights(REWARDS, REF, BEH, alpha, beta, clip, normalization)
    close(w, expected)
    flat = [x for row in expected for x in row]
    if clip == 1.5:
        assert any(x == 1.5 for x in flat) and any(x < 1.5 for x in flat)  # the case really clips
        assert w.max().item() == pytest.approx(1.5)
    else:
        assert max(flat) < clip


def test_alpha_to_zero_is_pure_trust_region():
    # α = 0: w = exp(A/β); the reference term vanishes whatever π_ref says
    beta = 0.7
    adv = py_advantages(REWARDS, "batch")
    wild_ref = [[x * 5 + 100 for x in row] for row in REF]
    for ref in (REF, wild_ref):
        w = dar_weights(t(REWARDS), t(ref), t(BEH), alpha=0.0, beta=beta, weight_clip=1e9)
        close(w, [[math.exp(a / beta) for a in row] for row in adv])
    # and the limit α → 0 is continuous
    w_small = dar_weights(t(REWARDS), t(REF), t(BEH), alpha=1e-12, beta=beta, weight_clip=1e9)
    close(w_small, [[math.exp(a / beta) for a in row] for row in adv], rel=1e-9)


def test_beta_to_zero_is_fixed_reference_target():
    # β = 0: w = (π_ref/π_t) · exp(A/α), the importance-sampled π_ref·exp(A/α) target
    alpha = 2.0
    adv = py_advantages(REWARDS, "none")
    expected = [[math.exp(REF[p][k]) / math.exp(BEH[p][k]) * math.exp(adv[p][k] / alpha) for k in range(3)]
                for p in range(3)]
    w = dar_weights(t(REWARDS), t(REF), t(BEH), alpha=alpha, beta=0.0, weight_clip=1e9,
                    advantage_normalization="none")
    close(w, expected)
    w_small = dar_weights(t(REWARDS), t(REF), t(BEH), alpha=alpha, beta=1e-12, weight_clip=1e9,
                          advantage_normalization="none")
    close(w_small, expected, rel=1e-9)


@pytest.mark.parametrize("normalization", ["batch", "none", "group"])
def test_k1_uses_batch_mean_baseline(normalization):
    rewards = [[1.0], [0.0], [2.0], [5.0]]  # batch mean 2 → A = (−1, −2, 0, 3)
    adv = advantages(t(rewards), normalization)
    raw = [-1.0, -2.0, 0.0, 3.0]
    if normalization == "batch":
        sd = statistics.stdev(raw)
        expected = [[(a - 0.0) / (sd + EPS)] for a in raw]
    else:  # "none"; and "group" has no group to normalise with K = 1, so A stays r − batch mean
        expected = [[a] for a in raw]
    close(adv, expected)
    w = dar_weights(t(rewards), t([[0.0]] * 4), t([[0.0]] * 4), alpha=0.5, beta=1.5, weight_clip=1e9,
                    advantage_normalization=normalization)
    close(w, [[math.exp(e[0] / 2.0)] for e in expected])
    assert len(set(w.reshape(-1).tolist())) == 4  # not all ≡ 1 as a per-prompt baseline would give


def test_single_sample_batch_is_finite():
    w = dar_weights(t([[3.0]]), t([[-1.0]]), t([[-1.0]]), alpha=0.01, beta=0.04)
    assert w.tolist() == [[1.0]]


def test_weights_are_detached_and_keep_dtype():
    r = torch.tensor(REWARDS, dtype=torch.float32, requires_grad=True)
    ref = torch.tensor(REF, requires_grad=True)
    w = dar_weights(r, ref, torch.tensor(BEH), alpha=0.01, beta=0.04)
    assert not w.requires_grad and w.dtype == torch.float32 and w.shape == (3, 3)
    # computed in float64 even for float32 inputs: a large A/(α+β) does not overflow before the clip
    w = dar_weights(torch.tensor([[1e4, 0.0]]), torch.zeros(1, 2), torch.zeros(1, 2), alpha=0.0, beta=1e-3,
                    weight_clip=20.0, advantage_normalization="none")
    assert w.tolist() == [[20.0, 0.0]]


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_rejected(bad):
    r = [row[:] for row in REWARDS]
    r[1][2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        dar_weights(t(r), t(REF), t(BEH), alpha=0.01, beta=0.04)


@pytest.mark.parametrize("shapes", [((3, 3), (3, 2), (3, 3)), ((3, 3), (3, 3), (9,)), ((9,), (9,), (9,)),
                                    ((2, 3), (3, 2), (2, 3))])
def test_shape_mismatch_rejected(shapes):
    a, b, c = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match="num_prompts, K"):
        dar_weights(a, b, c, alpha=0.01, beta=0.04)


@pytest.mark.parametrize("alpha,beta,clip,match", [
    (-0.01, 0.04, 20, "≥ 0"), (0.01, -0.04, 20, "≥ 0"), (0.0, 0.0, 20, "> 0"),
    (0.01, 0.04, 0.0, "weight_clip"), (0.01, 0.04, -1.0, "weight_clip"), (0.01, 0.04, float("nan"), "weight_clip"),
])
def test_impossible_coefficients_are_config_errors(alpha, beta, clip, match):
    with pytest.raises(ConfigError, match=match):
        dar_weights(t(REWARDS), t(REF), t(BEH), alpha=alpha, beta=beta, weight_clip=clip)
    with pytest.raises(ConfigError, match=match):
        DARConfig(dar_alpha=alpha, dar_beta=beta, weight_clip=clip)


def test_unknown_normalisation_is_config_error():
    with pytest.raises(ConfigError, match="advantage_normalization"):
        dar_weights(t(REWARDS), t(REF), t(BEH), alpha=0.01, beta=0.04, advantage_normalization="prompt")
    with pytest.raises(ConfigError, match="advantage_normalization"):
        DARConfig(advantage_normalization="prompt")


# ---------------------------------------------------------------- config: total/ratio ↔ alpha/beta
def test_config_total_ratio_and_alpha_beta():
    c = DARConfig()  # paper defaults: α+β = 0.05, α/(α+β) = 0.1, clip 20, batch normalisation
    assert (c.dar_alpha, c.dar_beta) == (pytest.approx(0.005), pytest.approx(0.045))
    assert c.weight_clip == 20.0 and c.advantage_normalization == "batch"
    c = DARConfig(dar_total=0.2, dar_ratio=0.25)
    assert (c.dar_alpha, c.dar_beta) == (pytest.approx(0.05), pytest.approx(0.15))
    c = DARConfig(dar_total=0.2, dar_ratio=0.0)  # ratio 0 → α = 0 (pure trust region)
    assert c.dar_alpha == 0 and c.dar_beta == pytest.approx(0.2)
    c = DARConfig(dar_alpha=0.3, dar_beta=0.1)  # explicit α, β win over total/ratio
    assert (c.dar_alpha, c.dar_beta) == (0.3, 0.1)
    with pytest.raises(ConfigError, match="both"):
        DARConfig(dar_alpha=0.3)
    for ratio in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="dar_ratio"):
            DARConfig(dar_ratio=ratio)
    with pytest.raises(ConfigError):
        DARConfig(dar_total=0.0)


def test_config_from_command_line(tmp_path):
    base = ["--dataset", "x.jsonl", "--annotator", str(_annotator_yaml(tmp_path))]
    _, algo = parse_train_args(base + ["--dar_total", "0.1", "--dar_ratio", "0.5"])
    assert (algo.dar_alpha, algo.dar_beta) == (pytest.approx(0.05), pytest.approx(0.05))
    _, algo = parse_train_args(base + ["--dar_alpha", "0.02", "--dar_beta", "0.08", "--weight_clip", "5",
                                       "--advantage_normalization", "group"])
    assert (algo.dar_alpha, algo.dar_beta, algo.weight_clip, algo.advantage_normalization) == (0.02, 0.08, 5.0, "group")


def _annotator_yaml(tmp_path):
    p = tmp_path / "ann.yaml"
    p.write_text("type: function\nfunction: math:fsum\n")
    return p


# ---------------------------------------------------------------- the objective: prepare + loss
def _shell_rollout(beh_seq: list[list[float]]) -> Rollout:
    """One completion token per sample, carrying the whole sequence log-prob."""
    P, K = len(beh_seq), len(beh_seq[0])
    N = P * K
    beh = torch.tensor([x for row in beh_seq for x in row]).view(N, 1)
    return Rollout(rows=[{"prompt": str(p)} for p in range(P)], prompts=[str(p) for p in range(P)],
                   completions=[""] * N, input_ids=torch.full((N, 2), 5), attention_mask=torch.ones(N, 2, dtype=torch.long),
                   completion_mask=torch.tensor([[0, 1]] * N), behaviour_token_logps=beh,
                   is_eos=torch.ones(N, dtype=torch.bool), num_generations=K)


def test_prepare_weights_and_metrics_by_hand():
    alpha, beta, clip = 0.02, 0.03, 1.5
    obj = DAR(DARConfig(dar_alpha=alpha, dar_beta=beta, weight_clip=clip), train=None)
    rollout = _shell_rollout(BEH)
    ref_tok = torch.tensor([x for row in REF for x in row]).view(9, 1)
    fb = Feedback(num_annotations=9, rewards=torch.tensor(REWARDS), valid=torch.ones(3, 3, dtype=torch.bool))
    prepared, m = obj.prepare(rollout, fb, ref_tok, model=None)
    expected = [x for row in py_weights(REWARDS, REF, BEH, alpha, beta, clip, "batch") for x in row]
    assert prepared["weights"].shape == (9,)
    for a, e in zip(prepared["weights"].tolist(), expected):
        assert a == pytest.approx(e, rel=1e-6)
    assert m["dar/weight_mean"] == pytest.approx(sum(expected) / 9, rel=1e-6)
    assert m["dar/weight_max"] == pytest.approx(max(expected), rel=1e-6)
    assert m["dar/clip_frac"] == pytest.approx(sum(x == clip for x in expected) / 9)
    diffs = [REF[p][k] - BEH[p][k] for p in range(3) for k in range(3)]
    assert m["dar/log_ratio_ref_behaviour"] == pytest.approx(sum(diffs) / 9, rel=1e-6)
    flat_adv = [a for row in py_advantages(REWARDS, "batch") for a in row]
    assert m["dar/advantage_std"] == pytest.approx(statistics.stdev(flat_adv), rel=1e-6)
    # an invalid label gets weight 0
    fb.valid[1, 2] = False
    prepared, _ = obj.prepare(rollout, fb, ref_tok, model=None)
    assert prepared["weights"][5].item() == 0.0 and prepared["weights"][4].item() > 0


def test_loss_gradient_on_a_toy_categorical():
    """π_θ(y) = softmax(θ)_y over 5 'sequences': ∇_θ log π(y) = e_y − softmax(θ), so the gradient of
    L = −mean_i w_i log π(y_i) is −(1/N) Σ_i w_i (e_{y_i} − p), computed here with math."""
    theta_vals = [0.3, -1.0, 0.5, 2.0, 0.0]
    ys = [0, 3, 3, 1, 4, 2]  # N = 6 samples: 3 prompts × K = 2
    weights = [0.7, 1.9, 0.01, 20.0, 1.0, 3.5]
    z = sum(math.exp(v) for v in theta_vals)
    p = [math.exp(v) / z for v in theta_vals]
    N = len(ys)
    expected = [-sum(w * ((1.0 if y == j else 0.0) - p[j]) for w, y in zip(weights, ys)) / N for j in range(5)]

    theta = torch.tensor(theta_vals, dtype=torch.float64, requires_grad=True)
    logps = torch.log_softmax(theta, 0)[torch.tensor(ys)]
    loss, _ = DAR(DARConfig(), train=None).loss(logps, {"weights": torch.tensor(weights, dtype=torch.float64)})
    loss.backward()
    for a, e in zip(theta.grad.tolist(), expected):
        assert a == pytest.approx(e, rel=1e-12, abs=1e-15)
    assert loss.item() == pytest.approx(-sum(w * math.log(p[y]) for w, y in zip(weights, ys)) / N)


def test_loss_gradient_on_tiny_model(tiny_policy):
    """Through the real model path (compute_loss → sequence_logps): the gradient of the DAR loss
    equals −Σ_i w_i ∇ log π(y_i|x_i) / N with each ∇ log π computed alone by autograd."""
    from daralign.core.config import TrainConfig
    from daralign.core.models import sequence_logps
    from daralign.rollout.hf import sample_rollout

    model, tok = tiny_policy
    torch.manual_seed(0)
    rows = [{"prompt": "Tell me about the ocean."}, {"prompt": "What is a good breakfast, please?"}]
    rollout = sample_rollout(model, tok, rows, num_generations=3, max_completion_length=6)
    N = 6
    obj = DAR(DARConfig(dar_alpha=0.5, dar_beta=0.5, weight_clip=3.0), train=TrainConfig())
    fb = Feedback(num_annotations=N, rewards=torch.tensor([[1.0, 0.0, 0.3], [0.2, 0.9, 0.4]]),
                  valid=torch.ones(2, 3, dtype=torch.bool))
    ref = rollout.behaviour_token_logps - 0.1 * rollout.completion_mask[:, 1:]  # a reference ≠ π_t
    with torch.no_grad():
        prepared, _ = obj.prepare(rollout, fb, ref, model)
    w = prepared["weights"]
    assert len(set(w.tolist())) > 2  # non-trivial weights
    params = [p for p in model.parameters()]
    batch = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
             "completion_mask": rollout.completion_mask, **prepared}
    model.zero_grad(set_to_none=True)
    loss = obj.compute_loss(model, batch).loss
    grads = torch.autograd.grad(loss, params)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(N):
        lp = sequence_logps(model, rollout.input_ids[i:i + 1], rollout.attention_mask[i:i + 1],
                            rollout.completion_mask[i:i + 1])
        gi = torch.autograd.grad(lp.sum(), params)
        for e, g in zip(expected, gi):
            e.add_(-w[i].item() * g / N)
    num = sum(((g - e) ** 2).sum() for g, e in zip(grads, expected)).sqrt()
    den = sum((e ** 2).sum() for e in expected).sqrt()
    assert den > 0 and (num / den).item() < 1e-4
