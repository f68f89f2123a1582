"""What daralign may touch in an ``output_dir``: only what it wrote, and nothing of an earlier run
before the new run has produced its replacement.

A run marks its folder with ``.daralign-run`` when it starts. A fresh run (no ``--resume``):

- in a missing or empty folder (or one holding only the ``heldout_before.json`` that ``daralign
  compare`` and ``train --with_control`` place) starts;
- in a folder of an earlier daralign run is refused unless ``--overwrite_output_dir true``; then
  that run's files are moved aside into ``.replaced/`` and deleted only when the new run has
  finished, so a failed run leaves the earlier one recoverable there;
- in a folder holding anything daralign did not write (a transformers Trainer's ``checkpoint-*``,
  the user's files) is refused, naming them. Nothing is ever deleted there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from daralign.core.errors import ConfigError

MARKER = ".daralign-run"
REPLACED = ".replaced"
# names a daralign run writes in its output_dir (tensorboard logs go in a folder named after it)
OWN = re.compile(r"^(metrics\.jsonl|completions\.jsonl|config\.yaml|provenance\.json|report\.md|[\w-]+\.png|"
                 r"heldout_[\w]+\.json|final|checkpoint-\d+|control|compare_run\.json|annotation_requests\.json|"
                 r"(train|eval)_dataset\.jsonl|\.[\w.-]+\.tmp)$")
PLACED_BEFORE_RUN = {"heldout_before.json"}


def own_files(out: Path) -> list[Path]:
    """The entries of a marked folder that daralign writes (tensorboard's folder included)."""
    return [p for p in out.iterdir() if OWN.match(p.name) or p.name == out.name]


def prepare(out: Path, *, resume: bool, overwrite: bool, is_main: bool = True) -> None:
    out = Path(out)
    entries = [p for p in out.iterdir() if p.name not in (MARKER, REPLACED)] if out.is_dir() else []
    ours = (out / MARKER).is_file()
    if ours:
        foreign = [p.name for p in entries if p not in own_files(out)]
    else:
        foreign = [p.name for p in entries if p.name not in PLACED_BEFORE_RUN]
    if foreign and not ours:
        raise ConfigError(f"output_dir {out} holds files daralign did not write ({', '.join(sorted(foreign)[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}); choose an empty or new output_dir")
    if ours and not resume and any(p.name not in PLACED_BEFORE_RUN for p in own_files(out)):
        if not overwrite:
            raise ConfigError(f"output_dir {out} holds an earlier daralign run; continue it with --resume, or replace it "
                              f"with --overwrite_output_dir true (its files are kept until the new run finishes)")
        if is_main:
            from daralign.core.tracking import console

            console.print(f"--overwrite_output_dir: the earlier run in {out} is moved to {out / REPLACED} and deleted "
                          f"when this run finishes")
            aside = out / REPLACED
            shutil.rmtree(aside, ignore_errors=True)  # a replaced run from an earlier failed attempt: ours
            aside.mkdir()
            for p in own_files(out):  # the earlier run's held-out scores too: this run makes its own
                os.replace(p, aside / p.name)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not ours:
            (out / MARKER).write_text(json.dumps({"written_by": "daralign"}) + "\n")


def finish(out: Path) -> None:
    """The new run is complete: the run it replaced can go."""
    shutil.rmtree(Path(out) / REPLACED, ignore_errors=True)


def save_final(out: Path, model, tokenizer, extra: dict, *, merge_lora: bool, state_dict: dict | None = None) -> None:
    """``final/``: a ``save_pretrained`` folder (LoRA merged, or the adapter alone), the tokenizer
    and an objective's extra modules as safetensors, written aside and renamed into place.
    ``state_dict``: the whole weights of a sharded model (``sharding.final_state``)."""
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if merge_lora and state_dict is not None:  # a sharded policy's weights, merged already (sharding.final_state)
        model = model.get_base_model()
    elif merge_lora:
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name, module in extra.items():
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def log_completions(path: Path, step: int, rollout, feedback, prompt_indices: list[int]) -> None:
    """Append every sampled completion of a step, its prompt's index and its reward, to ``path``."""
    K = rollout.num_generations
    n = len(rollout.completions)
    rewards = feedback.rewards.reshape(-1).tolist() if feedback.rewards is not None else [None] * n
    valid = feedback.valid.reshape(-1).tolist() if feedback.valid is not None else [True] * n
    with open(path, "a") as f:
        for i, text in enumerate(rollout.completions):
            f.write(json.dumps({"step": step + 1, "prompt_index": prompt_indices[i // K], "completion": text,
                                "reward": rewards[i] if valid[i] else None, "eos": bool(rollout.is_eos[i])}) + "\n")


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
