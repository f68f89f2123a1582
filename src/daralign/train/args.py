"""``daralign train``'s settings: YAML (``--config``) then flags → (``TrainConfig``, the algorithm's
config), with the annotators fitted to what the method learns from — all before any model loads.
The keys are the fields of ``TrainConfig``, of every registered rollout engine's ``Config`` (held
in ``TrainConfig.engine_configs``) and of the algorithm's ``Config``. The Python API and
``daralign compare`` build their runs through the same function."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from daralign.core.config import TrainConfig
from daralign.core.errors import ConfigError
from daralign.core.parsing import (
    ArgumentParser, attach_negative_numbers, base_type, coerce, dataclass_fields, field_help, parse_bool,
    parse_bool_or_auto, read_yaml, reconcile_parameterisations,
)


def parse_train_args(argv: list[str]) -> tuple[TrainConfig, Any]:
    """YAML (``--config``) then CLI overrides → (TrainConfig, the algorithm's config)."""
    from daralign.objectives import OBJECTIVES
    from daralign.rollout.base import describe_engines

    pre = ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--algorithm")
    known, _ = pre.parse_known_args(argv)
    values = read_yaml(known.config) if known.config else {}
    source = known.config or "command line"
    algorithm = known.algorithm or values.get("algorithm", TrainConfig.algorithm)
    objective_cls, fields, yaml_values = _checked_values(values, algorithm, source)

    # allow_abbrev=False: a misspelt prefix such as --learning_rat must be an error, as in YAML
    parser = ArgumentParser(
        prog="daralign train", allow_abbrev=False,
        description=f"Online alignment from AI feedback. Options below are for --algorithm {algorithm}; "
                    f"algorithms: {', '.join(sorted(OBJECTIVES))} (`--algorithm NAME --help` shows its own). "
                    f"Rollout engines (rollout_engine; auto takes the first that fits): {describe_engines()}. "
                    "Values: YAML (--config) first, then these flags.")
    parser.add_argument("--config", help="YAML file of field: value (flags override it)")
    parser.add_argument("--with_control", type=parse_bool, nargs="?", const=True, metavar="BOOL",
                        help="`daralign train` only: after the run, repeat it with rewards shuffled across each batch "
                             "(a control that separates learning from drift) in output_dir/control, and report both "
                             "(default: False)")
    for name, (_, tp, f) in fields.items():
        base, is_list = base_type(tp)
        kwargs: dict[str, Any] = {"help": field_help(f), "default": argparse.SUPPRESS}
        if base is bool:
            kwargs.update(type=parse_bool_or_auto if name == "bf16" else parse_bool, nargs="?", const=True, metavar="BOOL")
        elif is_list:
            kwargs.update(type=str)  # comma-separated
        elif base in (int, float, str):
            kwargs.update(type=base)
        parser.add_argument(f"--{name}", **kwargs)
    cli = vars(parser.parse_args(attach_negative_numbers(argv)))
    cli.pop("config", None)
    cli.pop("with_control", None)  # read by `daralign train` itself
    cli = {k: coerce(k, v, fields[k][1], "command line") for k, v in cli.items()}
    values = reconcile_parameterisations(objective_cls.Config, [(source, yaml_values), ("command line", cli)])
    return build_configs(values, objective_cls, fields)


def train_configs_from_values(values: dict, source: str) -> tuple[TrainConfig, Any]:
    """The Python API's way in (``daralign.TrainConfig(**values)``): the same checks, coercion,
    validation and annotator fitting as the CLI, errors naming ``source``."""
    algorithm = values.get("algorithm", TrainConfig.algorithm)
    objective_cls, fields, checked = _checked_values(values, algorithm, source)
    return build_configs(reconcile_parameterisations(objective_cls.Config, [(source, checked)]), objective_cls, fields)


def config_fields(objective_cls) -> dict:
    """The keys ``daralign train`` takes for this objective: name → (declaring class, type, field),
    over TrainConfig, every registered engine's Config (an engine that does not sample this run
    still has its keys: a config setting them for another engine loads) and the objective's."""
    from daralign.rollout.base import engine_config_classes

    classes = [TrainConfig, *engine_config_classes(), *([objective_cls.Config] if objective_cls.Config else [])]
    return {name: spec for name, spec in dataclass_fields(*classes).items() if not spec[2].metadata.get("flatten")}


def _checked_values(values: dict, algorithm: str, source: str):
    """(objective class, its fields with TrainConfig's and the engines', the values coerced to the
    fields' types); unknown keys are an error, another algorithm's keys a note."""
    from daralign.objectives import OBJECTIVES, get_objective

    objective_cls = get_objective(algorithm)
    fields = config_fields(objective_cls)
    others = {f.name for cls in OBJECTIVES.values() if cls.Config for f in dataclasses.fields(cls.Config)} - set(fields)
    unknown = sorted(set(values) - set(fields) - others)
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s) {unknown} for algorithm {algorithm!r}")
    ignored = sorted(set(values) & others)
    if ignored:
        from daralign.core.tracking import console

        console.print(f"note: {source}: {', '.join(ignored)} belong to other algorithms; ignored for {algorithm}")
    return objective_cls, fields, {k: coerce(k, v, fields[k][1], source) for k, v in values.items() if k not in others}


def build_configs(values: dict, objective_cls, fields) -> tuple[TrainConfig, Any]:
    from daralign.rollout.base import engine_config_classes

    def own(cls) -> dict:
        return {k: v for k, v in values.items() if fields[k][0] is cls}

    engines = tuple(cls(**own(cls)) for cls in engine_config_classes())  # the run's engine picks its own
    train = TrainConfig(**own(TrainConfig), engine_configs=engines)
    algo = objective_cls.Config(**own(objective_cls.Config)) if objective_cls.Config else None
    if isinstance(train.annotator, str):
        train.annotator = read_yaml(train.annotator)
    if isinstance(train.eval_annotator, str):
        train.eval_annotator = read_yaml(train.eval_annotator)
    train.validate()
    if train.annotator is None and objective_cls.feedback_kind != "offline":
        raise ConfigError(f"annotator: no annotator given (a mapping or a path to its YAML); {train.algorithm} learns from one")
    _fit_annotators(train, objective_cls.feedback_kind)
    return train, algo


def _fit_annotators(train: TrainConfig, kind: str) -> None:
    """Before any model loads: the annotator must give what the method learns from (a judge is
    switched to the mode the method needs, and that is said), and the evaluator must score."""
    from daralign.annotators import annotator_for

    if train.annotator is not None and kind != "offline":
        fitted = annotator_for(train.annotator, kind, train.algorithm,
                               needs_score=bool(train.eval_dataset) and train.eval_annotator is None)
        if "mode" in fitted and fitted["mode"] != train.annotator.get("mode", "score"):  # a judge, switched
            from daralign.core.tracking import console

            console.print(f"note: {train.algorithm} learns from {'preferences' if kind == 'compare' else 'scores'}: "
                          f"the judge is used in mode {fitted['mode']!r}")
        train.annotator = fitted
    if train.eval_annotator is not None:
        train.eval_annotator = annotator_for(train.eval_annotator, "score", "eval_annotator", needs_score=True)
