"""Metrics out: ``metrics.jsonl`` (one object per step), the console, and accelerate's trackers
(tensorboard / wandb) when ``report_to`` asks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, soft_wrap=True)  # a message stays one line, whatever the terminal width


def progress_bar(*columns, disable: bool = False) -> Progress:
    """A bar on daralign's console: description, bar, done/total, elapsed, then ``columns``."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), *columns, console=console, disable=disable)


def quiet_libraries() -> None:
    """The CLI's console shows daralign's progress and results. transformers' progress bar at every
    load and save, its notices, accelerate's note at every checkpoint that tied weights are saved
    once, and DeepSpeed's warning on a machine without an accelerator that it chose the CPU (it is
    imported by accelerate's unwrap wherever it is installed) are not for the user to act on;
    errors still print. (Python users keep their own settings.)"""
    import logging
    import os

    import torch
    from transformers.utils import logging as hf_logging

    if not torch.accelerator.is_available():  # what DeepSpeed would detect; told, it does not warn
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())


CONSOLE_KEYS = ("reward", "kl", "completions/mean_length", "dar/clip_frac", "loss", "annotations", "step_time")


def _finite(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


class MetricsLog:
    def __init__(self, output_dir: str | Path, accelerator=None, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        if resume_step is not None:
            self._truncate_after(resume_step)
        else:
            for path in (self.path, self.path.parent / "completions.jsonl"):
                path.unlink(missing_ok=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines the killed run wrote after its last checkpoint (atomically), and a
        torn last line left by a kill in the middle of a write."""
        if not self.path.exists():
            return

        def step_of(line: str) -> float:
            try:
                return json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                return float("inf")  # torn / foreign line: never kept

        keep = [line for line in self.path.read_text().splitlines() if line.strip() and step_of(line) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, metrics: dict, step: int, print_line: bool = True) -> None:
        record = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if print_line:
            parts = [f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in CONSOLE_KEYS if isinstance(metrics.get(k), (int, float))]
            console.print(f"[bold]step {step}[/bold] " + " ".join(parts))


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
