"""Checkpoints that survive ``kill -9``: written to a temp folder, renamed into place when
complete. A checkpoint holds accelerate's state (model safetensors; optimizer, scheduler and RNG
states, which accelerate writes with ``torch.save``), an objective's extra modules (PPO's value
head) as ``<name>.safetensors``, and ``trainer_state.json`` (step, annotation counts, the config
that trained it)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := PATTERN.match(p.name)) and (p / "trainer_state.json").is_file()]
    return sorted(found)


def latest(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def save(accelerator, output_dir: str | Path, step: int, state: dict, keep: int, modules: dict | None = None) -> Path:
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        for name, module in (modules or {}).items():
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path, modules: dict | None = None) -> dict:
    accelerator.load_state(str(path))
    for name, module in (modules or {}).items():
        module.load_state_dict(load_file(str(path / f"{name}.safetensors"), device=str(next(module.parameters()).device)))
    return json.loads((path / "trainer_state.json").read_text())


def saved_config(path: Path) -> dict | None:
    """The resolved config a checkpoint recorded (None: one from before configs were recorded)."""
    return json.loads((path / "trainer_state.json").read_text()).get("config")


def check_resume_config(path: Path, now: dict, may_change: set[str]) -> None:
    """--resume continues *this* run: a change that would alter training is refused, naming the
    fields; ``may_change`` (length, checkpoint, logging and eval cadence) may differ."""
    from daralign.core.errors import ConfigError

    saved = saved_config(path)
    if saved is None:
        return  # a checkpoint from before configs were recorded
    # a field added to daralign after the checkpoint was written is not a change
    changed = sorted(k for k in saved if k not in may_change and saved.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in changed[:3])
        raise ConfigError(f"--resume: {path} was trained with another config (changed: {', '.join(changed)}; {shown}"
                          f"{', ...' if len(changed) > 3 else ''}); resume with the same "
                          f"config (only {', '.join(sorted(may_change - {'resume'}))} may change), "
                          f"or start a new run in another output_dir")


def clean_partial(output_dir: str | Path) -> None:
    """Remove half-written checkpoints/final folders left by a killed run."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.glob(".*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
