"""`daralign compare`: several algorithms — and a grid of ablations of one of them — on one
annotation budget, then ``summary.json`` and ``report.html``.

Every run gets the same config (prompts, model, rollout, annotator, held-out set); runs differ only
in ``algorithm``, ``seed`` and the swept knobs. Each spends at most ``--annotation_budget`` annotator
*requests* (what the user pays: both orders of a comparison = 2, retries and invalid answers count,
cache hits are free); the loop cuts the last step to fit. Each method samples as its paper does:
reward methods K = ``num_generations`` responses per prompt, OAIF one pair (``oaif_num_generations``).
Offline ``dpo`` spends the same budget up front: pairs of the starting policy's answers on the
prompts OAIF would see, labelled by the annotator in compare mode (``offline.py``), then one
epoch over them — OAIF-DPO's number of steps. Runs go to ``D/<algorithm>[/<knob=value,...>]/seed<k>``;
``D/configs/<algorithm>.yaml`` is what each got.

With an ``eval_annotator`` (the *gold*) beside the training annotator (the *proxy*), every run's
held-out gold, proxy and KL at every evaluation become curves over requests spent
(``--eval_requests`` puts every method's evaluations at the same counts), summarised per method
with 95% CIs over seeds, P1, and the gold's peak and turn-down (``curves.py``);
``--best_of_n N`` adds the best-of-n reference on the starting policy (``evaluation/best_of_n.py``).

Judges: one config drives every method. A ``type: judge`` annotator is used in ``mode: compare``
for preference methods (``feedback_kind == "compare"``) and ``mode: score`` for reward methods —
same model, backend and template. Other annotator types are used as they are and must implement
what the method asks. The held-out score, the one number every method has, is the
``eval_annotator``'s when one is given — an independent yardstick — else the score-mode training
judge's, and the report says plainly which.

Repeating the command skips finished runs (``final/`` and ``compare_run.json``), continues
unfinished ones from their newest checkpoint, and refuses a run folder made with another config.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import itertools
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.markup import escape

from daralign.annotators import requests_per_label
from daralign.train import checkpoint
from daralign.core.config import TrainConfig, to_dict
from daralign.core.parsing import ArgumentParser, parse_bool, read_yaml
from daralign.train.args import config_fields, parse_train_args
from daralign.train.budget import requests_per_prompt
from daralign.core.errors import ConfigError
from daralign.core.provenance import provenance
from daralign.core.tracking import console
from daralign.objectives import OBJECTIVES, get_objective, method_in_role
from daralign.rollout.base import engine_class, engine_of, settings_of_other_engines

FORCED = {"algorithm": "--algorithms", "seed": "--seeds", "annotation_budget": "--annotation_budget",
          "output_dir": "--output_dir", "max_steps": "--annotation_budget (compare derives max_steps from it)"}
NOT_COMPARED = {"resume", "overwrite_output_dir", "report", "report_to", "logging_steps", "save_strategy", "save_steps", "save_total_limit",
                "log_completions"}
HELDOUT_KEYS = ("model_name_or_path", "dtype", "bf16", "trust_remote_code", "use_peft", "eval_dataset",
                "eval_max_prompts", "prompt_column", "max_completion_length", "eval_temperature",
                "generation_batch_size", "max_prompt_length", "eval_samples_per_prompt", "heldout_seed")


@dataclass
class Run:
    algorithm: str
    point: dict[str, str]  # swept knob -> value as typed
    seed: int
    out: Path
    train: TrainConfig = None
    algo: object = None
    per_step: int = 0  # nominal annotator requests per step (every label valid, nothing cached)
    K: int = 0  # responses sampled per prompt
    prompts: str | None = None  # an offline method: the prompt set its pairs are sampled on (its dataset is the pairs)

    @property
    def group(self) -> str:
        return self.algorithm + (f"[{','.join(f'{k}={v}' for k, v in self.point.items())}]" if self.point else "")


@dataclass
class Plan:
    runs: list[Run]
    budget: int
    seeds: list[int]
    algorithms: list[str]
    sweep: dict[str, list[str]] = field(default_factory=dict)
    sweep_algorithm: str | None = None
    configs: dict[str, dict] = field(default_factory=dict)  # algorithm -> the YAML values it got


# ---------------------------------------------------------------- parsing
def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="daralign compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
                        description="Run several algorithms on one annotation budget and report. "
                                    "Any other --field value is a config override for every run.")
    p.add_argument("--config", help="YAML config shared by every run (as for `daralign train`)")
    p.add_argument("--algorithms", required=True,
                   help=f"comma-separated, from {', '.join(sorted(OBJECTIVES))} (offline ones, "
                        f"{', '.join(n for n, cls in OBJECTIVES.items() if cls.feedback_kind == 'offline')}: the budget "
                        "buys pairs of the starting policy's answers, labelled by the annotator before training, then "
                        "one epoch over them)")
    p.add_argument("--annotation_budget", type=int, required=True,
                   help="annotator requests per run (both orders = 2; retries and invalid answers count; cache hits are free)")
    p.add_argument("--seeds", help="comma-separated seeds; none given: the config's seed")
    p.add_argument("--output_dir", default="runs/compare", help="one folder per run, summary.json, report.html")
    p.add_argument("--sweep", nargs="+", default=[], metavar="KNOB=V1,V2",
                   help="grid of values for --sweep_algorithm, e.g. dar_total=0.01,0.05 weight_clip=5,20")
    subject = method_in_role("subject")  # the method under study (``Objective.compare_role``)
    p.add_argument("--sweep_algorithm", default=subject, help="the algorithm the grid varies (the method compare studies)")
    p.add_argument("--override", nargs="+", default=[], metavar="ALGO:FIELD=VALUE",
                   help="a value for one algorithm only, e.g. rloo:kl_coef=0 or online-dpo:oaif_num_generations=4")
    p.add_argument("--eval_requests", type=int, default=0, metavar="N",
                   help="held-out evaluation every N annotator requests for every method (sets each run's eval_steps "
                        "to N ÷ its requests per step), so curves of all methods share their x values; 0: the config's eval_steps")
    p.add_argument("--best_of_n", type=int, default=0, metavar="N",
                   help="with an eval_annotator: best-of-n (n ≤ N) on the starting policy, chosen by the training annotator "
                        "and scored by the evaluator, as the reference on the gold-vs-√KL plot; 0: off")
    p.add_argument("--keep_checkpoints", type=parse_bool, default=False, metavar="BOOL",
                   help="keep each finished run's checkpoint (optimizer state); default: only final/")
    return p


def _split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{what}: empty list")
    if len(set(items)) != len(items):
        raise ConfigError(f"{what}: repeated value in {text!r}")
    return items


def _flag_pairs(tokens: list[str]) -> list[tuple[str, str | None]]:
    """``--name value`` / ``--name=value`` / bare ``--flag`` → [(name, value or None)]."""
    out, i = [], 0
    while i < len(tokens):
        t = tokens[i]
        if not t.startswith("--") or len(t) < 3:
            raise ConfigError(f"command line: unexpected {t!r} (config overrides are --field value)")
        if "=" in t:
            name, value = t[2:].split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            name, value = t[2:], tokens[i + 1]
            i += 2
        else:
            name, value = t[2:], None
            i += 1
        out.append((name, value))
    return out


def _argv(pairs) -> list[str]:
    return [x for name, value in pairs for x in ([f"--{name}"] + ([value] if value is not None else []))]


def expand_sweep(specs: list[str]) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """``["dar_total=0.01,0.05", "weight_clip=5,20"]`` → (knobs, the grid of points, first knob slowest)."""
    knobs: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--sweep: {spec!r} is not KNOB=V1,V2,...")
        if name in knobs:
            raise ConfigError(f"--sweep: knob {name!r} given twice")
        knobs[name] = _split_list(values, f"--sweep {name}")
    grid = [dict(zip(knobs, combo)) for combo in itertools.product(*knobs.values())] if knobs else [{}]
    return knobs, grid


def _fields(algorithm: str) -> set[str]:
    """Every config field of a run of ``algorithm`` (a method field shadowing a TrainConfig one is refused here)."""
    return set(config_fields(get_objective(algorithm)))  # TrainConfig's, the rollout engines', the method's


def _check_name(name: str, where: str) -> None:
    if name in FORCED:
        raise ConfigError(f"{where}: {name} is set by compare per run; use {FORCED[name]}")


def requests_per_step(train: TrainConfig, objective, annotator: dict) -> int:
    """Annotator requests one full step costs when every label is valid: the loop's cost model."""
    return train.prompts_per_step * requests_per_prompt(objective, annotator)


def build_plan(argv: list[str]) -> tuple[Plan, object]:
    opts, rest = _parser().parse_known_args(argv)
    overrides = _flag_pairs(rest)
    algorithms = _split_list(opts.algorithms, "--algorithms")
    if opts.annotation_budget < 1:
        raise ConfigError(f"--annotation_budget must be ≥ 1 (got {opts.annotation_budget})")
    known = {a: _fields(a) for a in algorithms}
    for name, _ in overrides:
        _check_name(name, f"--{name}")
        if not any(name in f for f in known.values()):
            raise ConfigError(f"--{name}: not a config field of any of {algorithms}")
    per_algo: dict[str, list] = {a: [] for a in algorithms}
    for spec in opts.override:
        algo_name, sep, rest_ = spec.partition(":")
        name, eq, value = rest_.partition("=")
        if not sep or not eq or not name:
            raise ConfigError(f"--override: {spec!r} is not ALGO:FIELD=VALUE")
        if algo_name not in known:
            raise ConfigError(f"--override: {algo_name!r} is not in --algorithms {algorithms}")
        _check_name(name, f"--override {spec}")
        if name not in known[algo_name]:
            raise ConfigError(f"--override: {name!r} is not a config field of {algo_name}")
        per_algo[algo_name].append((name, value))
    knobs, grid = expand_sweep(opts.sweep)
    if knobs:
        if opts.sweep_algorithm not in known:
            raise ConfigError(f"--sweep varies {opts.sweep_algorithm}, which is not in --algorithms {algorithms}")
        for name in knobs:
            _check_name(name, f"--sweep {name}")
            if name not in known[opts.sweep_algorithm]:
                raise ConfigError(f"--sweep: {name!r} is not a config field of {opts.sweep_algorithm}")

    # the YAML: keys of other algorithms' configs are dropped per algorithm, unknown keys are an error
    values = read_yaml(opts.config) if opts.config else {}
    everything = {name for cls in OBJECTIVES.values() for name in config_fields(cls)}
    unknown = sorted(set(values) - everything)
    if unknown:
        raise ConfigError(f"{opts.config}: unknown config key(s) {unknown}")
    if "max_steps" in values:
        console.print(f"note: max_steps from {opts.config} is ignored; compare derives it from --annotation_budget")
    seeds = [int(s) if s.lstrip("-").isdigit() else _bad_seed(s) for s in _split_list(opts.seeds, "--seeds")] \
        if opts.seeds else [int(values.get("seed", TrainConfig.seed))]
    out = Path(opts.output_dir)
    runs, configs = [], {}
    with tempfile.TemporaryDirectory() as tmp:  # nothing is written under --output_dir before the checks
        for a in algorithms:
            configs[a] = {k: v for k, v in values.items() if k in known[a] and k not in FORCED}
            cfg_path = Path(tmp) / f"{a}.yaml"
            cfg_path.write_text(yaml.safe_dump(configs[a], sort_keys=False))
            mine = [(n, v) for n, v in overrides if n in known[a]] + per_algo[a]
            for point in (grid if a == opts.sweep_algorithm and knobs else [{}]):
                for seed in seeds:
                    name = ",".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")
                    folder = out / a / name if point else out / a
                    run = Run(a, point, seed, folder / f"seed{seed}")
                    _resolve(run, cfg_path, mine, opts.annotation_budget, opts.eval_requests)
                    runs.append(run)
    plan = Plan(runs, opts.annotation_budget, seeds, algorithms, knobs, opts.sweep_algorithm if knobs else None, configs)
    return plan, opts


def _bad_seed(text: str):
    raise ConfigError(f"--seeds: {text!r} is not an integer")


def _resolve(run: Run, cfg_path: Path, overrides: list, budget: int, eval_requests: int = 0) -> None:
    """parse_train_args on the shared YAML + overrides + knob values, then compare's own fields."""
    argv = ["--config", str(cfg_path), "--algorithm", run.algorithm, *_argv(overrides),
            *_argv(run.point.items()), "--seed", str(run.seed)]
    if get_objective(run.algorithm).feedback_kind == "offline":
        return _resolve_offline(run, argv, budget, eval_requests)
    train, algo = parse_train_args(argv)
    objective = get_objective(run.algorithm)(algo, train)
    run.K = objective.num_generations()
    run.per_step = requests_per_step(train, objective, train.annotator)  # parse_train_args fitted the annotators
    nominal = math.ceil(budget / run.per_step)
    # Cache hits are free, so a run may need more steps than nominal: leave room unless the
    # learning-rate schedule's length depends on max_steps. The loop stops at the budget either way.
    max_steps = 2 * nominal if train.lr_scheduler_type.startswith("constant") else nominal
    run.train = dataclasses.replace(train, annotation_budget=budget, eval_steps=_eval_steps(run, train, eval_requests),
                                    max_steps=max_steps, output_dir=str(run.out), report=False)
    run.algo = algo


def _resolve_offline(run: Run, argv: list[str], budget: int, eval_requests: int) -> None:
    """An offline method (dpo): its dataset is the pairs the budget buys (``offline.py``, a file
    outside the run folder), sampled on the config's prompts and labelled by its annotator; one
    pair per prompt as OAIF labels them, and one epoch over them is OAIF's number of steps."""
    from daralign.annotators import annotator_for

    on_prompts, _ = parse_train_args(argv)
    if on_prompts.annotator is None:
        raise ConfigError(f"{run.algorithm} in compare: its pairs are labelled by the config's annotator, and there is none")
    annotator_for(on_prompts.annotator, "compare", f"{run.algorithm} (pair labels)", needs_score=False)
    run.prompts = on_prompts.dataset
    train, run.algo = parse_train_args(argv + ["--dataset", str(pairs_path(run))])
    run.K = 2
    run.per_step = train.prompts_per_step * requests_per_label(train.annotator, "compare")
    run.train = dataclasses.replace(train, annotation_budget=0, max_steps=max(1, budget // run.per_step),
                                    eval_steps=_eval_steps(run, train, eval_requests), output_dir=str(run.out), report=False)


def _eval_steps(run: Run, train: TrainConfig, eval_requests: int) -> int:
    """``eval_steps`` that puts held-out evaluations every ``eval_requests`` requests (0: the config's)."""
    if not eval_requests:
        return train.eval_steps
    if eval_requests % run.per_step:
        raise ConfigError(f"--eval_requests {eval_requests} is not a multiple of {run.algorithm}'s {run.per_step} "
                          f"requests per step; choose a common multiple of every method's")
    return eval_requests // run.per_step


def pairs_path(run: Run) -> Path:
    return run.out.parent / "pairs" / f"seed{run.seed}.jsonl"


# ---------------------------------------------------------------- running
def _fingerprint(run: Run) -> dict:
    return {k: v for k, v in to_dict(run.train, run.algo).items() if k not in NOT_COMPARED}


def _heldout_key(t: TrainConfig) -> str:
    scorer = without_mode(t.eval_annotator or t.annotator)  # one judge scores whatever mode trained with it
    proxy = without_mode(t.annotator) if t.eval_annotator is not None and t.eval_proxy_score else None
    blob = json.dumps({k: getattr(t, k) for k in HELDOUT_KEYS} | {"scorer": scorer, "proxy": proxy}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def without_mode(cfg: dict | None) -> dict | None:
    """An annotator config with the mode the run asks of it left out (the same annotator either way)."""
    return None if cfg is None else {k: v for k, v in cfg.items() if k != "mode"}


def finished(run: Run) -> bool:
    return (run.out / "final").is_dir() and (run.out / "compare_run.json").is_file()


def check_existing(run: Run) -> None:
    """A finished run folder must have been made with the same config."""
    if not finished(run):
        return
    old = json.loads((run.out / "compare_run.json").read_text()).get("config", {})
    new = json.loads(json.dumps(_fingerprint(run), default=str))
    defaults = {f.name: f.default for c in (run.train, *run.train.engine_configs, run.algo) if c is not None
                for f in dataclasses.fields(c)}
    # a field added by a later daralign, at its default, changes nothing the old run did; nor do the
    # settings of engines other than the one both runs sample with
    kind = get_objective(run.train.algorithm).feedback_kind
    engine = engine_class(run.train, kind)
    idle = settings_of_other_engines(engine) if engine_of(old, kind) is engine else set()
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in idle
                  and not (k not in old and new.get(k) == defaults.get(k)))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"{run.out} was made with another config ({shown}); use another --output_dir or delete that folder")


def execute(run: Run, index: int, total: int, root: Path, keep_checkpoints: bool, budget: int) -> None:
    from daralign.train.command import run as train_run

    title = escape(f"[{index}/{total}] {run.group} · seed {run.seed}")  # a sweep group is `dar[knob=value]`, not markup
    if finished(run):
        console.print(f"[dim]{title}: finished earlier, skipped[/dim]")
        return
    console.rule(f"[bold]{title}[/bold] · budget {run.train.annotation_budget} requests, "
                 f"{run.per_step} per step")
    run.out.mkdir(parents=True, exist_ok=True)
    # an interrupted run goes on from its checkpoint; one killed before any checkpoint starts again
    run.train = dataclasses.replace(run.train, resume=checkpoint.latest(run.out) is not None, overwrite_output_dir=True)
    # The pre-training held-out score depends only on the base model, eval set, sampling and judge:
    # reuse it across runs (it runs in its own RNG stream, so skipping it changes no training).
    cached = root / ".heldout_before" / f"{_heldout_key(run.train)}.json"
    before = run.out / "heldout_before.json"
    if run.train.eval_dataset and cached.is_file() and not before.exists():
        shutil.copyfile(cached, before)
    t0 = time.perf_counter()
    labels, train = None, run.train
    if get_objective(run.algorithm).feedback_kind == "offline":  # its labels come before training: buy the pairs
        from daralign.compare.offline import label_pairs

        labels = label_pairs(dataclasses.replace(run.train, dataset=run.prompts), budget, pairs_path(run))
        # one epoch is the pairs that survived (ties and invalid labels give none): no pair seen twice
        train = dataclasses.replace(run.train, max_steps=max(1, -(-labels["pairs"] // run.train.prompts_per_step)))
    train_run(train, run.algo)
    wall = time.perf_counter() - t0
    if run.train.eval_dataset and before.is_file() and not cached.is_file():
        cached.parent.mkdir(exist_ok=True)
        shutil.copyfile(before, cached)
    if not keep_checkpoints:
        for p in run.out.glob("checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
    record = {"group": run.group, "algorithm": run.algorithm, "point": run.point, "seed": run.seed,
              "requests_per_step": run.per_step, "requests_per_prompt": run.per_step // run.train.prompts_per_step,
              "num_generations": run.K, "wall_time_s": wall, "config": _fingerprint(run)}
    if labels is not None:
        record["label_requests"], record["pairs"] = labels["requests"], labels["pairs"]
    (run.out / "compare_run.json").write_text(json.dumps(record, indent=1, default=str))
    gc.collect()


def best_of_n_reference(train: TrainConfig, n_max: int, root: Path) -> None:
    """``best_of_n.json``: once per compare folder (and eval set, model, scorers)."""
    from daralign.evaluation.best_of_n import measure_best_of_n

    path = root / "best_of_n.json"
    key = {"heldout": _heldout_key(train), "n_max": n_max}
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return
    console.rule(f"[bold]best-of-n reference[/bold] (n ≤ {n_max}, starting policy, proxy picks, evaluator scores)")
    path.write_text(json.dumps({"key": key, **measure_best_of_n(train, n_max)}, indent=1))


def main(argv: list[str]) -> int:
    from daralign.compare.report import print_table, summarise, write_html

    plan, opts = build_plan(argv)
    root = Path(opts.output_dir)
    for run in plan.runs:
        check_existing(run)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "provenance.json").write_text(json.dumps(provenance(), indent=1))
    for algorithm, values in plan.configs.items():
        (root / "configs" / f"{algorithm}.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    console.print(f"compare: {len(plan.runs)} runs ({', '.join(plan.algorithms)}; seeds {plan.seeds}"
                  + (f"; {plan.sweep_algorithm} grid {plan.sweep}" if plan.sweep else "")
                  + f") on {plan.budget} annotator requests each → {root}")
    for i, run in enumerate(plan.runs, 1):
        execute(run, i, len(plan.runs), root, opts.keep_checkpoints, plan.budget)
    if opts.best_of_n and plan.runs[0].train.eval_annotator is not None:
        best_of_n_reference(plan.runs[0].train, opts.best_of_n, root)
    summary = summarise(plan, root)
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    report = write_html(summary, root)
    print_table(summary)
    console.print(f"summary: {root / 'summary.json'}\nreport: {report}")
    return 0
