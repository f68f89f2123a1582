"""The numbers the docs state, against the committed JSON that holds them (issue 32), and the
sealed test set: its sha256 in docs/testbed.md, and its prompts disjoint, exactly and by
template, from every prompt set the shipped configs and proxies use."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS, STUDY = ROOT / "docs", ROOT / "docs" / "img" / "study"
TEST_SET = ROOT / "examples" / "testbed" / "test.jsonl"
COSINE_LIMIT = 0.70  # docs/testbed.md: the dev–train near-duplicates score 0.90 and 0.97


def prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def trigrams(text: str) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


def other_prompt_sets() -> dict[str, list[str]]:
    """Every prompt file a shipped config names (``dataset``, ``eval_dataset``), every other prompt
    file beside them, and the prompts every shipped learned proxy was fitted on."""
    files = {p for p in (ROOT / "examples").rglob("*.jsonl")}
    for cfg in (ROOT / "examples").rglob("*.yaml"):
        values = yaml.safe_load(cfg.read_text()) or {}
        for key in ("dataset", "eval_dataset"):
            if isinstance(values.get(key), str) and (ROOT / values[key]).is_file():
                files.add(ROOT / values[key])
    sets = {str(f.relative_to(ROOT)): prompts(f) for f in sorted(files) if f != TEST_SET}
    for record in (DOCS / "img").rglob("agreement.json"):  # a proxy fitted by `daralign fit-proxy`
        proxy = record.parent
        sets[f"{proxy.relative_to(ROOT)} (fit data)"] = [json.loads(x)["prompt"] for x in
                                                        (proxy / "samples.jsonl").read_text().splitlines()]
        dataset = json.loads(record.read_text())["config"]["dataset"]
        sets[f"{dataset} (the proxy's dataset)"] = prompts(ROOT / dataset)
    return sets


# ---------------------------------------------------------------- the sealed test set
def test_the_test_set_is_sealed_by_its_sha256_in_the_doc():
    doc = (DOCS / "testbed.md").read_text()
    stated = re.search(r"\| test \| `examples/testbed/test\.jsonl` \| (\d+) \| sealed, sha256 `([0-9a-f]{64})` \|", doc)
    assert stated, "docs/testbed.md's table of prompt sets lost the test set's line"
    assert hashlib.sha256(TEST_SET.read_bytes()).hexdigest() == stated[2], "examples/testbed/test.jsonl was edited"
    assert int(stated[1]) == len(prompts(TEST_SET))
    assert "The rule for the test set, written 2026-12-07, before any run has seen it." in doc


def test_the_test_set_is_disjoint_from_every_other_prompt_set():
    test = prompts(TEST_SET)
    assert len({" ".join(words(q)) for q in test}) == len(test) == 32
    sets = other_prompt_sets()
    assert {"examples/testbed/train.jsonl", "examples/testbed/heldout.jsonl", "examples/data/quickstart_train.jsonl",
            "examples/data/quickstart_heldout.jsonl", "docs/img/testbed/proxy (fit data)"} <= set(sets)
    for name, others in sets.items():
        exact = {" ".join(words(q)) for q in others}
        starts = {tuple(words(q)[:3]) for q in others}
        grams = set().union(*(trigrams(q) for q in others))
        for q in test:
            assert " ".join(words(q)) not in exact, (q, name)
            assert tuple(words(q)[:3]) not in starts, f"{q!r} opens with a template of {name}"
            assert not trigrams(q) & grams, f"{q!r} shares {trigrams(q) & grams} with {name}"


def test_no_test_prompt_is_a_near_duplicate_by_minilm():
    from daralign.annotators.learned import embed

    test = prompts(TEST_SET)
    others = sorted({q for qs in other_prompt_sets().values() for q in qs})
    cosine = embed(test) @ embed(others).T
    nearest = cosine.max(dim=1)
    worst = int(nearest.values.argmax())
    assert nearest.values.max() <= COSINE_LIMIT, (test[worst], others[int(nearest.indices[worst])])
    # the threshold separates what the doc calls near-duplicates: the two closest dev–train pairs
    dev = ["What is a fun thing to do with friends?", "What can I do to relax after work?"]
    train = ["What is a fun thing to do with friends on a weekend?", "What is a good way to relax after work?"]
    assert (embed(dev) * embed(train)).sum(-1).min() > 0.85 > COSINE_LIMIT


# ---------------------------------------------------------------- the study (docs/testbed.md)
def t_interval(xs):
    from daralign.compare.paired import t_interval

    return t_interval(xs)


def test_the_study_tables_in_the_doc_are_study_md():
    doc, md = (DOCS / "testbed.md").read_text(), (STUDY / "study.md").read_text()
    table = md[md.index("Paired within-seed differences"):md.index("\n\n**Verdict")]
    assert table in doc, "docs/testbed.md's paired table or P1 line differs from img/study/study.md: rerun study.py"
    res = json.loads((STUDY / "study.json").read_text())
    p1 = res["p1"]
    assert p1["p1_ci_high"] == "never" and f"[{p1['p1_ci_low']:.2f}, never]" in doc
    assert f"in {p1['p1_never_frac']:.0%} of the\nseed resamples" in doc
    dar_dpo = res["paired_asked"]["dar − online-dpo"]
    mde = dar_dpo["gold_after"]["mde80"], dar_dpo["gold_curve_mean"]["mde80"]
    assert f"{mde[0]:.3f} at the budget and {mde[1]:.3f} over the curve" in doc
    assert f"DAR − OAIF-DPO's is {dar_dpo['gold_after']['se']:.4f}" in doc
    assert res["verdict"] == "undecided" and "**Verdict on the paper's claim: undecided at this power.**" in doc


def test_no_doc_claims_a_difference_would_have_shown():
    for page in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        assert "would have shown" not in page.read_text(), page


def test_the_study_sentences_recompute_from_study_json():
    doc = (DOCS / "testbed.md").read_text()
    res = json.loads((STUDY / "study.json").read_text())
    arms = {a["arm"]: a for a in res["arms"]}
    control = res["paired_asked"]["dar − its shuffled-reward control"]["gold_after"]
    assert f"({control['mean'] / control['se']:.1f} SE; MDE {control['mde80']:.3f})" in doc  # 4.4, not 4.5
    z = {name: a["gold_change"] / a["gold_change_se"] for name, a in arms.items()}
    clean = [z[a] for a in ("dar", "online-dpo", "rloo", "grpo", "dar, dar_ratio 0")]
    noisy = [z[a] for a in ("dar, 25% noise", "online-dpo, 25% noise")]
    assert f"by {min(clean):.1f}–{max(clean):.1f} standard errors over\n  seeds on the clean proxy and " \
           f"{min(noisy):.1f}–{max(noisy):.1f} on the noisy one" in doc
    kl_dar, kl_control = arms["dar"]["kl_at_budget"], arms["dar, shuffled rewards"]["kl_at_budget"]
    assert f"(KL {kl_control:.1f} at the budget, against DAR's {kl_dar:.1f}: {1 - kl_control / kl_dar:.0%} less)" in doc


def test_rloo_against_dar_over_ten_seeds():
    """Seeds 1–8 from the committed run records, seeds 9–10 from rloo-dar-seeds9-10.json (the
    values issue 32 gives): the doc's ten-seed interval, and its leave-one-out count."""
    runs = [r for name in ("summary-dar-online-dpo.json", "summary-four-methods-seeds1-5.json",
                           "summary-rloo-grpo-seeds6-8.json") for r in json.loads((STUDY / name).read_text())["runs"]]
    after = {(r["group"], r["seed"]): r["gold_after"] for r in runs}
    diffs = {s: after["rloo", s] - after["dar", s] for s in range(1, 9)}
    later = json.loads((STUDY / "rloo-dar-seeds9-10.json").read_text())
    for seed, v in later["seeds"].items():
        assert v["rloo_minus_dar"] == pytest.approx(v["rloo_gold_change"] - v["dar_gold_change"], abs=1e-9)
        diffs[int(seed)] = v["rloo_minus_dar"]
    ten = t_interval(list(diffs.values()))
    stated = later["rloo_minus_dar_seeds1_10"]
    assert ten["n"] == stated["n"] == 10
    assert ten["mean"] == pytest.approx(stated["mean"], abs=5e-5) and ten["se"] == pytest.approx(stated["se"], abs=5e-5)
    assert ten["mean"] - ten["ci95"] == pytest.approx(stated["ci95_low"], abs=5e-5)
    assert ten["mean"] + ten["ci95"] == pytest.approx(stated["ci95_high"], abs=5e-5)
    sys.path.insert(0, str(ROOT / "examples" / "testbed"))
    try:
        from study import mde80
    finally:
        sys.path.pop(0)
    assert mde80(ten) == pytest.approx(stated["mde80"], abs=5e-5)
    spans = sum(t["mean"] - t["ci95"] < 0 < t["mean"] + t["ci95"] for t in
                (t_interval([d for k, d in diffs.items() if k != s]) for s in diffs))
    assert spans == stated["leave_one_out_ci_spans_zero"] == 9
    doc = (DOCS / "testbed.md").read_text()
    low, high = ten["mean"] - ten["ci95"], ten["mean"] + ten["ci95"]
    text = f"**{ten['mean']:+.3f} ± {ten['se']:.3f} [{low:+.3f}, {high:+.3f}]**".replace("-", "−")
    assert text in doc and f"MDE {mde80(ten):.3f}" in doc and "undecided over ten seeds" in doc
    assert "RLOO first" not in doc and "buys more" not in doc  # the ranking is no longer stated as settled
    eight = t_interval([diffs[s] for s in range(1, 9)])
    import statistics

    assert f"SD rose from {statistics.stdev(diffs[s] for s in range(1, 9)):.3f} to " \
           f"{statistics.stdev(diffs.values()):.3f}" in doc
    assert eight["mean"] == pytest.approx(0.0154, abs=1e-4)


# ---------------------------------------------------------------- the quickstart (docs/quickstart.md, README)
def test_the_quickstart_numbers_say_what_their_error_is_over():
    """Issue 32, item 3: the headline is the seed-level figure from seeds.json; the one-seed run on the
    earlier prompts stays, said to be over prompts of one seed."""
    seeds = json.loads((DOCS / "img" / "quickstart" / "seeds.json").read_text())
    doc, readme = (DOCS / "quickstart.md").read_text(), (ROOT / "README.md").read_text()
    fmt = lambda x: f"{x:+.3f}".replace("-", "−")  # noqa: E731
    for key in ("gold_gain_over_start", "gold_gain_over_control", "control_gold_change"):
        s = seeds[key]
        assert s["n_seeds"] == len(seeds["per_seed"]) >= 5
        assert f"{fmt(s['mean'])} ± {s['se']:.3f}" in doc, key
        assert f"{fmt(s['ci95'][0])} to {fmt(s['ci95'][1])}" in doc, key
    for key in ("gold_gain_over_start", "gold_gain_over_control"):
        s = seeds[key]
        assert f"{fmt(s['mean'])} ± {s['se']:.3f} ({s['mean_over_se']:.1f} SE" in readme, key
    assert "Measured over five training seeds (± over seeds)" in readme
    for row in seeds["per_seed"]:  # each seed's row, its ± over that run's prompts
        assert (f"| {row['seed']} | {fmt(row['gold_gain_over_start'])} ± {row['gold_gain_over_start_se_prompts']:.3f} | "
                f"{fmt(row['gold_gain_over_control'])} ± {row['gold_gain_over_control_se_prompts']:.3f} |") in doc
    wall = [w for w in seeds["wall_s_run_and_control"]]
    assert all(wall) and f"**{round(min(wall)) // 60} min {round(min(wall)) % 60} s to {round(max(wall)) // 60} min " \
                          f"{round(max(wall)) % 60} s**" in doc
    assert "The quickstart's goal is not met." in doc  # 1.9 SE < 3
    assert seeds["gold_gain_over_start"]["mean_over_se"] < 3

    res = json.loads((DOCS / "img" / "quickstart" / "results.json").read_text())
    z_control = res["gold_delta_vs_control"] / res["gold_delta_vs_control_se"]
    z_start = res["trained"]["gold_delta"] / res["trained"]["gold_delta_se"]
    assert (round(z_control, 1), round(z_start, 1)) == (5.4, 2.0)
    assert "5.4 standard errors over the 32 held-out prompts of one\n  training seed" in doc
    assert "## Earlier: one seed on the earlier prompts" in doc
    assert "Neither set was used to fit the proxy" not in doc
    assert f"(KL {res['control']['kl_after']:.1f},\n  about DAR's {res['trained']['kl_after']:.1f})" in doc
    assert "Both took longer than" not in doc and "7 min 37 s" not in doc + readme


def learned_proxies(annotator) -> list[Path]:
    """Every ``{type: learned, path: DIR}`` in an annotator config, members of composites included."""
    if isinstance(annotator, str) and annotator.endswith((".yaml", ".yml")) and (ROOT / annotator).is_file():
        return learned_proxies(yaml.safe_load((ROOT / annotator).read_text()))  # an annotator named by its file
    if isinstance(annotator, list):
        return [p for a in annotator for p in learned_proxies(a)]
    if not isinstance(annotator, dict):
        return []
    found = [ROOT / annotator["path"]] if annotator.get("type") == "learned" else []
    return found + [p for v in annotator.values() if isinstance(v, (dict, list)) for p in learned_proxies(v)]


def configs_on_a_learned_proxy() -> list[str]:
    """Every shipped training config (a YAML under examples/ naming a ``dataset``) whose annotator or
    yardstick is, or holds, a learned proxy."""
    found = []
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        if isinstance(cfg, dict) and cfg.get("dataset") and learned_proxies([cfg.get("annotator"), cfg.get("eval_annotator")]):
            found.append(str(path.relative_to(ROOT)))
    return found


def test_every_config_on_a_learned_proxy_is_checked_for_overlap():
    assert configs_on_a_learned_proxy() == ["examples/quickstart.yaml", "examples/testbed/study.yaml"]


@pytest.mark.parametrize("config", configs_on_a_learned_proxy())
def test_a_configs_prompts_are_disjoint_from_its_proxy_fit_data_and_the_test_set(config):
    """Issue 32, item 1, for each shipped config trained on a learned proxy (the quickstart, the
    test-set study): the prompts its proxy was fitted on (the prompts of its ``samples.jsonl``, and
    the whole ``dataset`` its fit config named), the prompts it trains on (``dataset``), its held-out
    prompts (``eval_dataset``) and the sealed test set are pairwise disjoint — exactly, by their first
    three words, by any run of three words, and by MiniLM cosine at most COSINE_LIMIT — and no two
    training prompts share a first-three-words template. (The test set as its ``eval_dataset`` is one
    set, not two.)"""
    from daralign.annotators.learned import embed

    cfg = yaml.safe_load((ROOT / config).read_text())
    proxies = learned_proxies([cfg.get("annotator"), cfg.get("eval_annotator")])
    assert ROOT / "docs/img/testbed/proxy" in proxies, f"{config} no longer trains on the testbed's proxy"
    fit = set()
    for proxy in proxies:
        fit |= {json.loads(x)["prompt"] for x in (proxy / "samples.jsonl").read_text().splitlines() if x.strip()}
        fit |= set(prompts(ROOT / json.loads((proxy / "agreement.json").read_text())["config"]["dataset"]))
    sets = {"the proxy's fit prompts": sorted(fit), "its training prompts": prompts(ROOT / cfg["dataset"]),
            "its held-out prompts": prompts(ROOT / cfg["eval_dataset"]), "the test set": prompts(TEST_SET)}
    if ROOT / cfg["eval_dataset"] == TEST_SET:
        del sets["its held-out prompts"]
    assert all(sets.values())
    train = sets["its training prompts"]
    assert len({tuple(words(q)[:3]) for q in train}) == len(train), "two training prompts share a template"
    vectors = {name: embed(qs) for name, qs in sets.items()}
    overlaps = []
    for (a, qa), (b, qb) in itertools.combinations(sets.items(), 2):
        exact, starts = {" ".join(words(q)) for q in qb}, {tuple(words(q)[:3]) for q in qb}
        grams = set().union(*(trigrams(q) for q in qb))
        for q in qa:
            if " ".join(words(q)) in exact:
                overlaps.append(f"{q!r} of {a} is in {b}")
            elif tuple(words(q)[:3]) in starts:
                overlaps.append(f"{q!r} of {a} opens with a template of {b}")
            elif trigrams(q) & grams:
                overlaps.append(f"{q!r} of {a} shares {sorted(trigrams(q) & grams)} with {b}")
        cosine = vectors[a] @ vectors[b].T
        for i, j in (cosine > COSINE_LIMIT).nonzero().tolist():
            overlaps.append(f"{qa[i]!r} of {a} ~ {qb[j]!r} of {b}: MiniLM cosine {float(cosine[i, j]):.2f}")
    # and the config's own prompts against every other prompt set of the repository (dev, other configs')
    own = {cfg["dataset"], cfg["eval_dataset"]}
    for name, others in other_prompt_sets().items():
        if name in own:
            continue
        exact, starts = {" ".join(words(q)) for q in others}, {tuple(words(q)[:3]) for q in others}
        grams, vectors_other = set().union(*(trigrams(q) for q in others)), embed(others)
        for which in own - {str(TEST_SET.relative_to(ROOT))}:
            mine = prompts(ROOT / which)
            overlaps += [f"{q!r} of {which} overlaps {name}" for q in mine if " ".join(words(q)) in exact
                         or tuple(words(q)[:3]) in starts or trigrams(q) & grams]
            cosine = float((embed(mine) @ vectors_other.T).max())
            if cosine > COSINE_LIMIT:
                overlaps.append(f"{which} ~ {name}: MiniLM cosine {cosine:.2f}")
    assert not overlaps, f"{len(overlaps)} overlaps:\n" + "\n".join(overlaps)


@pytest.mark.parametrize("name", ["async_judge.json", "async_judge_xeon.json"])
def test_the_async_benchmark_table_is_its_json(name):
    """Each machine's table in docs/performance.md (an AMD EPYC, an Intel Xeon) is its JSON."""
    res = json.loads((DOCS / "img" / "performance" / name).read_text())
    doc = (DOCS / "performance.md").read_text()
    for entry in res["runs"].values():
        for run in entry["runs"]:
            n = str(run["async_steps"])
            row = (f"| {run['async_steps']} | {run['step_time_median']:.2f} | ", f"{entry['ratio_to_ideal'][n]:.2f} |")
            assert row[0] in doc and row[1] in doc, row
    one = res["runs"]["judge about as slow as the update"]
    assert f"| 1 | {one['runs'][1]['step_time_median']:.2f} | **{one['ratio_to_sync']['1']:.2f}** | " \
           f"**{one['ratio_to_bound']['1']:.2f}** |" in doc
    assert res["goal"]["met"] is False
    if "calibration" in res:  # latency auto: the ideal that puts 0.65 out of reach, as the doc says
        assert f"{one['ideal_s']:.2f} s, {one['ideal_s'] / one['runs'][0]['step_time_median']:.2f} of the synchronous" in doc
        assert f"{res['calibration']['update_median_s']:.2f} s" in doc and f"{res['calibration']['latency_s']:.2f} s a request" in doc
    else:
        assert "**The goal is half met.**" in doc


# ---------------------------------------------------------------- every measured table figure has its JSON
NO_JSON: set[str] = set()  # pages whose tables hold figures no committed JSON has (none now)


def json_numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from json_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_numbers(v)


def tables_with_figures(page: Path):
    """(line, the table's headline figures, the JSON files its section names) for each table of a
    doc whose bold cells hold numbers (the docs' mark of a measured result)."""
    lines = page.read_text().splitlines()
    heading, i = 0, 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = i
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| :]+\|$", lines[i + 1]):
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            figures = [f for bold in re.findall(r"\*\*([^*]+)\*\*", "\n".join(lines[i:end]))
                       for f in re.findall(r"[−+-]?\d+\.\d+(?:%| pts)?", bold)]
            section_end = end
            while section_end < len(lines) and not lines[section_end].startswith("#"):
                section_end += 1
            named = re.findall(r"`([^`\s]+\.json)`", "\n".join(lines[heading:section_end]))
            files = [base / n for n in named for base in (ROOT, DOCS) if (base / n).is_file()]
            if figures:
                yield i + 1, figures, files
            i = end
        else:
            i += 1


def test_every_headline_figure_in_a_docs_table_is_in_a_json_its_section_names():
    """Issue 32, item 6: a bold number in a table of docs/*.md is a measurement; its section names a
    committed JSON holding that number at the precision shown."""
    missing = []
    for page in sorted(DOCS.glob("*.md")):
        for line, figures, files in tables_with_figures(page):
            values = [v for f in files for v in json_numbers(json.loads(f.read_text()))]
            for fig in figures:
                scales = (1, 100) if fig.endswith(("%", " pts")) else (1,)  # a percentage: of a fraction, or as it is
                number = fig.removesuffix("%").removesuffix(" pts")
                x, digits = float(number.replace("−", "-")), len(number.split(".")[1])
                if not any(round(abs(v * k), digits) == round(abs(x), digits) for v in values for k in scales):
                    missing.append(f"{page.name}:{line}: {fig}")
    assert {m.split(":")[0] for m in missing} == NO_JSON, "\n".join(missing)


def test_the_agreement_page_is_its_json():
    """docs/results-agreement.md's table and sentences from img/agreement/summary*.json, and the
    summary from the committed records (no judge call)."""
    from daralign.evaluation.agreement import agreement_summary

    img, doc = DOCS / "img" / "agreement", (DOCS / "results-agreement.md").read_text()
    res = json.loads((img / "summary.json").read_text())
    records = [json.loads(x) for x in (img / "records.jsonl").read_text().splitlines() if x.strip()]
    again = agreement_summary(records, n_boot=2000, seed=0, tie_margin=res["tie_margin"], score_tie_margin=res["score_tie_margin"])
    assert again["preference_both_orders"] == res["preference_both_orders"] and again["reward"] == res["reward"]
    pct = lambda x: f"{100 * x:.1f}".replace("-", "−")  # noqa: E731
    for label, key in (("AI reward (score both)", "reward"), ("AI preference, both orders", "preference_both_orders")):
        s = res[key]
        assert (f"| {label} | **{pct(s['agreement'])}%** | [{pct(s['ci_low'])}, {pct(s['ci_high'])}] | "
                f"{s['agree']} / {s['disagree']} / {s['ties']} |") in doc, label
    d = res["reward_minus_preference"]
    assert f"+{pct(d['diff'])} pts [{pct(d['ci_low'])}, +{pct(d['ci_high'])}]" in doc
    zero = json.loads((img / "summary-tie-margin-0.json").read_text())["preference_both_orders"]
    assert f"{pct(zero['agreement'])}% [{pct(zero['ci_low'])}, {pct(zero['ci_high'])}]" in doc
    both = res["preference_both_orders"]
    assert f"Among the {both['agree'] + both['disagree']} decided pairs" in doc and f"{both['ties']} of the 200 pairs" in doc


def test_the_test_set_study_in_the_doc_is_its_study_md():
    """The sealed test set's study (issue 32, items 2 and 4): docs/testbed.md carries img/study-test/study.md's
    tables and verdict as study.py wrote them from the committed run records, all 12 seeds of every arm."""
    page = DOCS / "img" / "study-test"
    doc, md = (DOCS / "testbed.md").read_text(), (page / "study.md").read_text()
    res = json.loads((page / "study.json").read_text())
    assert res["seeds"] == list(range(1, 13))
    for a in res["arms"]:
        assert a["seeds"] == 12, a["arm"]
    arms = md[md.index("| arm |"):md.index("\n\nPaired within-seed")]
    table = md[md.index("Paired within-seed differences"):md.index("\n\n**Verdict")]
    assert arms in doc and table in doc, "docs/testbed.md's test-set tables differ from img/study-test/study.md: rerun study.py"
    verdict = md[md.index("**Verdict"):].split("**")[1]
    assert verdict in doc


def test_the_lag_study_in_the_doc_is_its_async_study_md():
    """The lag study (issue 33, item 5): async_study.py, rerun on the committed run records (each seed's
    six runs on one machine), gives the committed async_study.json, all 12 seeds of each of its six
    arms; docs/testbed.md carries async_study.md's tables and answer as it wrote them."""
    page = DOCS / "img" / "study-async"
    sys.path.insert(0, str(ROOT / "examples" / "testbed"))
    import async_study
    from study import jsonable, load

    records = {k: sorted(page.glob(f"summary-async{k}-seeds*.json")) for k in (0, 1, 2)}
    again = async_study.analyse(load(records[0]), {k: load(records[k], f" @ async {k}") for k in (1, 2)})
    res = json.loads((page / "async_study.json").read_text())
    assert json.loads(json.dumps(jsonable(again))) == res, "img/study-async/async_study.json is not its records' analysis"
    assert res["seeds"] == list(range(1, 13)) and len(res["cpu_per_seed"]) == 12
    assert sorted(res["arms"]) == sorted(async_study.arm(m, k) for m in async_study.METHODS for k in (0, 1, 2))
    assert all(a["seeds"] == 12 for a in res["arms"].values())
    doc, md = (DOCS / "testbed.md").read_text(), (page / "async_study.md").read_text()
    arms = md[md.index("| arm |"):md.index("\n\nPaired within-seed")]
    table = md[md.index("| difference |"):md.index("\n\n**Is DAR")]
    answer = md[md.index("**Is DAR"):].split("**")[1]
    assert arms in doc and table in doc and answer in doc, \
        "docs/testbed.md's lag-study tables differ from img/study-async/async_study.md: rerun async_study.py"
    assert res["answer"] in answer
    # what the lag did inside the runs, as the doc reads it (img/study-async/lag_metrics.json)
    inside = json.loads((page / "lag_metrics.json").read_text())["arms"]
    assert all(a["seeds"] == list(range(1, 13)) for a in inside.values()) and len(inside) == 6
    dar = inside["dar"]
    assert f"synchronous DAR arm its mean is {dar['dar/weight_mean']:.1f}, and {dar['dar/clip_frac']:.0%} of the samples reach the cap" in doc
    lag1, lag2 = inside["rloo @ async 1"], inside["rloo @ async 2"]
    assert f"weight averaged {lag1['async/is_weight_mean']:.2f} at lag 1 and {lag2['async/is_weight_mean']:.2f} at lag 2" in doc
    assert f"{lag1['async/is_truncated_frac']:.0%} and {lag2['async/is_truncated_frac']:.0%} of\n  sequences" in doc
    assert f"(mean staleness {inside['dar @ async 2']['async/staleness']:.2f} updates)" in doc
