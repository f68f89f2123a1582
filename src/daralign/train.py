"""`daralign train`: parse the config, run the online loop, write the report.

With ``--with_control true`` the same run is repeated with rewards shuffled across each batch
(in ``output_dir/control``) and the report puts both side by side.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from daralign.config import _ArgumentParser, _parse_bool, parse_train_args
from daralign.tracking import console


def run(train, algo) -> dict:
    from daralign.loop import OnlineTrainer

    trainer = OnlineTrainer(train, algo)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    if trainer.eval_rows and trainer.accelerator.is_main_process:
        prompts = [r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"] for r in trainer.eval_rows]
        (Path(train.output_dir) / "heldout_prompts.json").write_text(json.dumps(prompts))
    return result


def main(argv: list[str]) -> int:
    train, algo = parse_train_args(argv)
    pre = _ArgumentParser(add_help=False, allow_abbrev=False)  # a train-command option, not a TrainConfig field
    pre.add_argument("--with_control", type=_parse_bool, nargs="?", const=True, default=False)
    with_control = pre.parse_known_args(argv)[0].with_control
    run(train, algo)
    control_dir = None
    if with_control:
        control_dir = str(Path(train.output_dir) / "control")
        console.print("[bold]control run:[/bold] same config, rewards shuffled across each batch")
        run(dataclasses.replace(train, output_dir=control_dir, shuffle_rewards=True, report=False), algo)
    if train.report:
        from daralign.report import fmt, heldout_summary, write_report

        path = write_report(train.output_dir, control_dir)
        console.print(f"report: {path}")
        for label, d in [("trained", train.output_dir), ("control", control_dir)]:
            s = heldout_summary(d) if d else None
            if s:
                console.print(f"held-out {label}: {fmt(s['before'])} → {fmt(s['after'])} "
                              f"({fmt(s['diff'], '+.4f')} ± {fmt(s['se'])}), KL {fmt(s['kl_after'], '.2f')}, "
                              f"length {s['length_before']:.1f} → {s['length_after']:.1f}")
    console.print(f"final model: {Path(train.output_dir) / 'final'}")
    return 0
