"""Prompt datasets (TRL formats) and their validation.

A row is ``{"prompt": str}`` or ``{"prompt": [{"role": ..., "content": ...}, ...]}``; other columns
pass through untouched to reward functions and evaluation. Sources: ``.jsonl``/``.json`` files
(optionally ``.gz``) or a ``datasets`` name. Every problem names the file, row and field.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import torch

from daralign.errors import DataError

ROLES = {"system", "user", "assistant", "tool"}


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl/.json file (gz allowed); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    with _open(path) as f:
        if stem_suffix == ".json":
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON: {e}") from None
            if isinstance(rows, dict) and isinstance(rows.get("data"), list):
                rows = rows["data"]
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of objects")
        else:
            rows = []
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n}: not valid JSON: {e.msg}") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
    return rows


def check_prompt(value: Any, where: str, column: str = "prompt") -> None:
    """Raise ``DataError`` unless ``value`` is a non-empty string or list of chat messages."""
    if value is None:
        raise DataError(f"{where}: field {column!r} is missing")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {column!r} is empty")
        return
    if isinstance(value, list) and value:
        for j, msg in enumerate(value):
            if not (isinstance(msg, dict) and isinstance(msg.get("content"), str) and msg.get("role") in ROLES):
                raise DataError(
                    f"{where}: field {column!r}[{j}] must be {{'role': one of {sorted(ROLES)}, 'content': str}}, got {msg!r}"
                )
        if not any(m["content"].strip() for m in value):
            raise DataError(f"{where}: field {column!r} has only empty messages")
        return
    raise DataError(
        f"{where}: field {column!r} must be a string or a non-empty list of chat messages, got {type(value).__name__}"
    )


def _read_source(source: str, split: str, config: str | None) -> tuple[list[dict], str]:
    """(rows, name for messages) of a file or a ``datasets`` name."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".gz") or path.exists():
        rows, name = read_rows(path), str(path)
    else:
        import datasets

        try:
            rows = list(datasets.load_dataset(source, config, split=split))
        except Exception as e:  # the datasets library raises many kinds; the user needs the name
            raise DataError(f"dataset {source!r} (split {split!r}) could not be loaded: {e}") from None
        name = f"{source}[{split}]"
    if not rows:
        raise DataError(f"{name}: no rows")
    return rows, name


def load_prompts(source: str, *, column: str = "prompt", split: str = "train", config: str | None = None) -> list[dict]:
    """Load and validate prompt rows; the prompt is copied to key ``prompt`` if ``column`` differs."""
    rows, name = _read_source(source, split, config)
    out = []
    for i, row in enumerate(rows):
        check_prompt(row.get(column), f"{name}: row {i}", column)
        out.append({**row, "prompt": row[column]})
    return out


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(transcript: str) -> list[dict] | None:
    """An HH-RLHF transcript (``\n\nHuman: … \n\nAssistant: …``) as chat messages; None if it
    is not one."""
    parts = HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _split_pair_side(value: Any, where: str, field: str) -> tuple[Any, str]:
    """(implicit prompt or None, response text) of one side of a preference row."""
    if isinstance(value, str):
        messages = hh_messages(value)
        if messages is None:
            return None, value  # a plain response string (the row's prompt says what it answers)
        value = messages
    if isinstance(value, list) and value:
        check_prompt(value, where, field)
        last = value[-1]
        if last["role"] != "assistant":
            raise DataError(f"{where}: field {field!r} must end with an assistant turn (the response), got role {last['role']!r}")
        return (value[:-1] or None), last["content"]
    raise DataError(f"{where}: field {field!r} must be a string or a list of chat messages, got {type(value).__name__}")


def load_pairs(source: str, *, column: str = "prompt", split: str = "train", config: str | None = None) -> list[dict]:
    """Preference rows for offline DPO, in any of TRL's preference formats, as
    ``{"prompt": str | messages, "chosen": str, "rejected": str, ...}``:

    - explicit prompt: ``prompt`` + ``chosen``/``rejected`` as strings or as assistant message lists;
    - implicit prompt: ``chosen``/``rejected`` as whole conversations (message lists, or HH-RLHF
      ``\n\nHuman: … \n\nAssistant: …`` transcripts) split at the last assistant turn.

    Rows whose two transcripts differ before the last assistant turn are not a pair: they are
    skipped, and one line says how many and which.
    """
    rows, name = _read_source(source, split, config)
    out, mismatched = [], []
    for i, row in enumerate(rows):
        where = f"{name}: row {i}"
        for field in ("chosen", "rejected"):
            if row.get(field) is None:
                raise DataError(f"{where}: field {field!r} is missing (offline dpo needs prompt, chosen, rejected)")
        (p_c, chosen), (p_r, rejected) = (_split_pair_side(row[f], where, f) for f in ("chosen", "rejected"))
        prompt = row.get(column)
        if prompt is None:
            if p_c is None or p_r is None:
                raise DataError(f"{where}: field {column!r} is missing and chosen/rejected are not whole conversations")
            if p_c != p_r:
                mismatched.append(i)
                continue
            prompt = p_c if len(p_c) > 1 or p_c[0]["role"] != "user" else p_c[0]["content"]
        check_prompt(prompt, where, column)
        out.append({**row, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    if mismatched:
        from daralign.tracking import console

        console.print(f"[yellow]{name}: skipped {len(mismatched)} row(s) whose chosen and rejected differ before the last "
                      f"assistant turn (not a pair): rows {mismatched[:10]}{' ...' if len(mismatched) > 10 else ''}[/yellow]")
    if not out:
        raise DataError(f"{name}: no usable preference rows")
    return out


def as_messages(prompt: Any) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def render_prompt(tokenizer, prompt: Any) -> str:
    """The text the policy is conditioned on: chat template with the generation prompt when the
    tokenizer has one, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
    return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)


class PromptSchedule:
    """Which prompts step t sees: epochs of seeded permutations, so the position of any step is a
    pure function of (seed, step) and a resumed run sees exactly the prompts it would have."""

    def __init__(self, rows: list[dict], prompts_per_step: int, seed: int) -> None:
        self.rows, self.per_step, self.seed = rows, prompts_per_step, seed

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def indices(self, step: int) -> list[int]:
        n = len(self.rows)
        start = step * self.per_step
        out = []
        for pos in range(start, start + self.per_step):
            out.append(self._order(pos // n)[pos % n])
        return out

    def batch(self, step: int) -> list[dict]:
        return [self.rows[i] for i in self.indices(step)]
