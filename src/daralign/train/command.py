"""`daralign train`: parse the config, run the online loop, write the report.

With ``--with_control true`` the same run is repeated with rewards shuffled across each batch
(in ``output_dir/control``) and the report puts both side by side.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from daralign.core.parsing import ArgumentParser, parse_bool
from daralign.train.args import parse_train_args
from daralign.core.tracking import console


def run(train, algo, **given) -> dict:
    """One run of the loop; ``given``: parts the Python API hands over (``OnlineTrainer``'s keywords)."""
    from daralign.train.loop import OnlineTrainer

    trainer = OnlineTrainer(train, algo, **given)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    if trainer.eval_rows and trainer.accelerator.is_main_process:
        prompts = [r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"] for r in trainer.eval_rows]
        (Path(train.output_dir) / "heldout_prompts.json").write_text(json.dumps(prompts))
    return result


def _share_heldout_before(run_dir: Path, control_dir: Path) -> None:
    """The control starts from the same model and samples its held-out answers with the same seed
    in its own RNG stream, so its before-training score is the trained run's: copy it into a new
    control folder rather than judge it twice (an existing folder is left to ``outputs.prepare``)."""
    before = run_dir / "heldout_before.json"
    if before.is_file() and not control_dir.exists():
        control_dir.mkdir()
        shutil.copyfile(before, control_dir / before.name)


def main(argv: list[str]) -> int:
    from daralign.annotators.backends import keep_loaded

    train, algo = parse_train_args(argv)
    pre = ArgumentParser(add_help=False, allow_abbrev=False)  # a train-command option, not a TrainConfig field
    pre.add_argument("--with_control", type=parse_bool, nargs="?", const=True, default=False)
    with_control = pre.parse_known_args(argv)[0].with_control
    control_dir = None
    with keep_loaded():  # the control is judged by the run's loaded judge, not a second load
        run(train, algo)
        if with_control:
            control_dir = str(Path(train.output_dir) / "control")
            console.print("[bold]control run:[/bold] same config, rewards shuffled across each batch")
            _share_heldout_before(Path(train.output_dir), Path(control_dir))
            run(dataclasses.replace(train, output_dir=control_dir, shuffle_rewards=True, report=False), algo)
    if train.report:
        from daralign.train.report import control_gap, fmt, heldout_summary, write_report

        path = write_report(train.output_dir, control_dir)
        console.print(f"report: {path}")
        for label, d in [("trained", train.output_dir), ("control", control_dir)]:
            s = heldout_summary(d) if d else None
            if s:
                proxy = (f"; training annotator {fmt(s['proxy_before'])} → {fmt(s['proxy_after'])} "
                         f"({fmt(s['proxy_diff'], '+.4f')} ± {fmt(s['proxy_se'])})") if s["proxy_before"] is not None else ""
                console.print(f"held-out {label}: {fmt(s['before'])} → {fmt(s['after'])} "
                              f"({fmt(s['diff'], '+.4f')} ± {fmt(s['se'])}){proxy}, KL {fmt(s['kl_after'], '.2f')}, "
                              f"length {s['length_before']:.1f} → {s['length_after']:.1f}")
        gap = control_gap(train.output_dir, control_dir) if control_dir else None
        if gap:
            console.print(f"trained − control after training: {fmt(gap['diff'], '+.4f')} ± {fmt(gap['se'])}"
                          + (f" (training annotator {fmt(gap['proxy_diff'], '+.4f')} ± {fmt(gap['proxy_se'])})"
                             if gap["proxy_diff"] is not None else ""))
    console.print(f"final model: {Path(train.output_dir) / 'final'}")
    return 0
