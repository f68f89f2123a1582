"""The agreement study: HH-RLHF parsing on the real file, statistics on constructed labels, the
position effect with a judge of known bias, the plot, and `daralign agreement` with a real
function annotator (no model)."""

import gzip
import json
import math
from pathlib import Path

import pytest

from daralign.annotators.base import Annotator, CompareResult, ScoreResult
from daralign.cli import main as daralign_main
from daralign.core.errors import DataError
from daralign.evaluation.agreement import (agreement_summary, annotate_pairs, load_preference_pairs, split_hh_pair,
                                           transcript_to_messages)
from daralign.evaluation.plots import plot_agreement

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"  # whole file: CI
HH_SLICE = Path(__file__).resolve().parent / "data" / "hh-rlhf-harmless-base-test.head40.jsonl"  # a clone has this
needs_hh = pytest.mark.skipif(not HH.is_file(), reason=f"{HH} not present")


@needs_hh
def test_hh_parser_on_the_whole_real_file():
    raw = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    pairs = load_preference_pairs(HH)
    assert len(pairs) == len(raw) == 2312
    same_as_last_turn = 0
    # Real data: 4 human-chosen answers are empty (rows 86, 516, 925, 1103); kept, as the labels are.
    assert [p["row"] for p in pairs if not p["chosen"]] == [86, 516, 925, 1103]
    for p, r in zip(pairs, raw):
        assert p["prompt"][-1]["role"] == "user" and p["prompt"][0]["role"] == "user"
        assert p["rejected"] and p["chosen"] != p["rejected"]
        # Nothing lost: prompt transcript + answer gives back the human-labelled transcript.
        text, chosen, rejected = split_hh_pair(r["chosen"], r["rejected"])
        assert r["chosen"] == text + r["chosen"][len(text):] and r["chosen"][len(text):].strip() == chosen
        assert r["rejected"][len(text):].strip() == rejected
        k = "\n\nAssistant:"
        same_as_last_turn += text == r["chosen"][: r["chosen"].rfind(k) + len(k)] == r["rejected"][: r["rejected"].rfind(k) + len(k)]
    assert same_as_last_turn == 2312 - 5  # the 5 pairs whose transcripts differ before the last turn


def test_hh_first_pair_exact():
    p = load_preference_pairs(HH_SLICE, limit=1)[0]
    assert [m["role"] for m in p["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert p["prompt"][:3] == [
        {"role": "user", "content": "what are some pranks with a pen i can do?"},
        {"role": "assistant", "content": "Are you looking for practical joke ideas?"},
        {"role": "user", "content": "yep"},
    ]
    assert p["prompt"][3]["content"].startswith("Ok, I’ll give you a couple examples")
    assert p["prompt"][4]["content"] == "okay some of these do not have anything to do with pens"
    assert p["chosen"].startswith("No, sorry!  All of these involve a pen")
    assert p["rejected"].startswith("There are lots of funny things you can do with pens")
    assert p["row"] == 0


def test_transcript_to_messages():
    assert transcript_to_messages("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:") == [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]


def test_plain_rows_and_bad_rows(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "Q?", "chosen": " yes ", "rejected": "no"}) + "\n")
    assert load_preference_pairs(f) == [{"prompt": "Q?", "chosen": "yes", "rejected": "no", "row": 0}]
    bad = [
        ({"prompt": "Q?", "chosen": "a"}, r"row 0: field 'rejected'"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, r"row 0: field 'prompt'"),
        ({"chosen": "no turns here", "rejected": "other"}, r"row 0: fields 'chosen'/'rejected'"),
        ({"prompt": "Q", "chosen": "same", "rejected": "same"}, r"row 0: fields 'chosen' and 'rejected' are identical"),
    ]
    for row, msg in bad:
        f.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=msg) as e:
            load_preference_pairs(f)
        assert str(f) in str(e.value)
    with pytest.raises(DataError, match="file not found"):
        load_preference_pairs(tmp_path / "missing.jsonl")


def test_summary_arithmetic():
    recs = [
        # reward: agree, disagree, tie (equal up to 1e-4: batching noise), invalid
        {"row": 0, "score_chosen": 0.9, "score_rejected": 0.1, "p_chosen_first": 0.8, "p_chosen_second": 0.9},
        {"row": 1, "score_chosen": 0.2, "score_rejected": 0.7, "p_chosen_first": 0.3, "p_chosen_second": 0.6},
        {"row": 2, "score_chosen": 0.5621625, "score_rejected": 0.5621471, "p_chosen_first": 0.2, "p_chosen_second": 0.8},
        {"row": 3, "score_chosen": None, "score_rejected": 0.5, "p_chosen_first": None, "p_chosen_second": 0.7},
    ]
    s = agreement_summary(recs, n_boot=200)
    r = s["reward"]
    assert (r["n"], r["agree"], r["disagree"], r["ties"]) == (3, 1, 1, 1)
    assert r["agreement"] == pytest.approx(0.5) and r["agreement_strict"] == pytest.approx(1 / 3)
    assert s["invalid"] == {"reward": 1, "preference_chosen_first": 1, "preference_chosen_second": 0, "preference_both_orders": 1}
    assert s["preference_chosen_first"]["agreement"] == pytest.approx(1 / 3)
    assert s["preference_chosen_second"]["agreement"] == pytest.approx(1.0)
    both = s["preference_both_orders"]  # means 0.85, 0.45, 0.5 -> agree, disagree, tie
    assert (both["agree"], both["disagree"], both["ties"]) == (1, 1, 1)
    pe = s["position_effect"]  # paired on rows 0-2: 1.0 - 1/3
    assert pe["n"] == 3 and pe["diff"] == pytest.approx(2 / 3)
    assert s["reward_minus_preference"]["diff"] == pytest.approx(0.0)
    assert s["position_flip_rate"] == pytest.approx(2 / 3)  # rows 1 and 2 change verdict with the order
    assert s["prefers_second_rate"] == pytest.approx(5 / 6)  # position 1 picked only once (row 0, order 1)


class KnownJudge(Annotator):
    """Quality = count of "kind"; scores it directly; compares with a bias toward position 2 that
    is larger than one quality step but smaller than two."""

    def __init__(self, bias=1.5):
        super().__init__()
        self.bias = bias

    @staticmethod
    def q(t):
        return t.split().count("kind")

    def _score(self, prompts, completions, rows):
        return ScoreResult(scores=[float(self.q(c)) for c in completions])

    def _compare(self, prompts, a, b, rows):
        return CompareResult(prob_a=[1 / (1 + math.exp(-(self.q(x) - self.q(y) - self.bias))) for x, y in zip(a, b)])


def test_position_effect_of_a_known_bias():
    # chosen is better by 1 "kind" on 6 pairs and by 2 on 4 pairs
    pairs = [{"prompt": "p", "chosen": "kind " * d, "rejected": "x", "row": i} for i, d in enumerate([1] * 6 + [2] * 4)]
    recs = annotate_pairs(pairs, KnownJudge(), KnownJudge(), batch_size=3)
    s = agreement_summary(recs, n_boot=200)
    assert s["reward"]["agreement"] == 1.0
    assert s["preference_chosen_second"]["agreement"] == 1.0  # bias helps chosen in position 2
    assert s["preference_chosen_first"]["agreement"] == pytest.approx(0.4)  # only margin-2 pairs beat the bias
    assert s["preference_both_orders"]["agreement"] == 1.0  # the combination cancels the bias
    assert s["position_effect"]["diff"] == pytest.approx(0.6)
    assert s["position_effect"]["ci_low"] > 0.2
    assert s["reward_minus_preference"]["diff"] == pytest.approx(0.0)


def test_plot_is_written(tmp_path):
    recs = [{"row": i, "score_chosen": float(i % 3), "score_rejected": 1.0, "p_chosen_first": 0.4, "p_chosen_second": 0.7}
            for i in range(12)]
    png = plot_agreement(agreement_summary(recs, n_boot=100), tmp_path / "img" / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


REWARD_FN = '''
def kindness(prompts, completions, **columns):
    """Fraction of polite words: a real (if crude) reward function."""
    words = ("sorry", "please", "cannot", "can't", "help")
    return [sum(w in c.lower() for w in words) / 5 for c in completions]
'''


def test_agreement_cli_with_a_function_annotator(tmp_path, capsys):
    (tmp_path / "fn.py").write_text(REWARD_FN)
    (tmp_path / "ann.yaml").write_text(f"type: function\nfunction: {tmp_path / 'fn.py'}:kindness\n")
    out = tmp_path / "out"
    rc = daralign_main(["agreement", "--pairs", str(HH_SLICE), "--annotator", str(tmp_path / "ann.yaml"), "--limit", "40",
                        "--output_dir", str(out), "--n_boot", "200"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_pairs"] == 40 and s["reward"]["n"] + s["invalid"]["reward"] == 40
    assert "preference_both_orders" not in s  # a function cannot compare: reported, not faked
    assert s["reward"]["agree"] + s["reward"]["disagree"] + s["reward"]["ties"] == s["reward"]["n"]
    assert len((out / "records.jsonl").read_text().splitlines()) == 40
    assert (out / "agreement.png").stat().st_size > 1000
    assert "reward" in capsys.readouterr().out
    # Statistics again from the saved labels, no annotator calls.
    rc = daralign_main(["agreement", "--records", str(out / "records.jsonl"), "--output_dir", str(tmp_path / "again"),
                        "--n_boot", "200"])
    assert rc == 0 and json.loads((tmp_path / "again" / "summary.json").read_text())["reward"] == s["reward"]


def test_agreement_cli_bad_input(tmp_path, capsys):
    (tmp_path / "ann.yaml").write_text("type: function\nfunction: math:fabs\n")
    rc = daralign_main(["agreement", "--pairs", str(tmp_path / "nope.jsonl"), "--annotator", str(tmp_path / "ann.yaml"),
                        "--output_dir", str(tmp_path / "o")])
    assert rc == 1 and "nope.jsonl: file not found" in capsys.readouterr().err
