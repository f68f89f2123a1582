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

from daralign.core.errors import DataError

ROLES = {"system", "user", "assistant", "tool"}


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl/.json file (gz allowed); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if stem_suffix in (".csv", ".parquet"):
        return _read_with_datasets(path, stem_suffix[1:])
    try:
        return _read_json_rows(path, stem_suffix)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); save it as UTF-8") from None


def _read_with_datasets(path: Path, kind: str) -> list[dict]:
    """csv / parquet through the ``datasets`` library (as TRL users load them)."""
    import datasets

    try:
        return list(datasets.load_dataset(kind, data_files=str(path), split="train"))
    except Exception as e:  # pyarrow and datasets raise many kinds; the user needs the file and the reason
        raise DataError(f"{path}: cannot be read as {kind}: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None


def _read_json_rows(path: Path, stem_suffix: str) -> list[dict]:
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


def rows_in_memory(source: Any, name: str) -> list[dict]:
    """The rows of a ``datasets.Dataset`` or a list of dicts, or one line naming the argument."""
    try:
        rows = [dict(r) for r in source]
    except (TypeError, ValueError):
        raise DataError(f"{name}: expected a datasets.Dataset, a list of dicts or a path, got {type(source).__name__}") from None
    if not rows:
        raise DataError(f"{name}: no rows")
    return rows


def _read_source(source: Any, split: str, config: str | None, name: str | None = None) -> tuple[list[dict], str]:
    """(rows, name for messages) of a file, a ``datasets`` name, or rows in memory (a
    ``datasets.Dataset`` or a list of dicts, from the Python API: ``name`` says which argument)."""
    if not isinstance(source, (str, Path)):
        return rows_in_memory(source, name or "dataset"), name or "dataset"
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".gz", ".csv", ".parquet") or path.exists():
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


def load_prompts(source: Any, *, column: str = "prompt", split: str = "train", config: str | None = None,
                 name: str | None = None) -> list[dict]:
    """Load and validate prompt rows; the prompt is copied to key ``prompt`` if ``column`` differs."""
    rows, name = _read_source(source, split, config, name)
    out = []
    for i, row in enumerate(rows):
        check_prompt(row.get(column), f"{name}: row {i}", column)
        out.append({**row, "prompt": row[column]})
    return out


HH_ASSISTANT = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def transcript_to_messages(text: str) -> list[dict]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: ...\\n\\nAssistant:"`` → chat messages
    (user/assistant); the trailing empty assistant turn (where the answer goes) is dropped."""
    parts = HH_TURN.split(text)
    messages = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
                for speaker, content in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) from two HH-RLHF transcripts.

    The prompt is their shared prefix cut at its last ``"\\n\\nAssistant:"`` (kept in the prompt);
    the answers are what follows, stripped. Cutting inside the *common* prefix (as TRL's
    ``extract_prompt``), not at each transcript's own last turn, also handles the few pairs whose
    transcripts differ earlier (5 of 2,312 in harmless-base test): there the answers carry the rest
    of the dialogue.
    """
    n, limit = 0, min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0:
        raise ValueError('the transcripts share no "\\n\\nAssistant:" turn')
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def _response(value: Any, where: str, field: str) -> str:
    """One side of an explicit-prompt pair: a string, or messages ending with the assistant's answer."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant" \
            and isinstance(value[-1].get("content"), str):
        return value[-1]["content"].strip()
    raise DataError(f"{where}: field {field!r} must be a string or chat messages ending with an assistant turn")


def load_pairs(source: Any, *, column: str = "prompt", split: str = "train", config: str | None = None,
               name: str | None = None) -> list[dict]:
    """Preference rows for offline DPO (and the agreement study), in any of TRL's preference
    formats, as ``{"prompt": str | messages, "chosen": str, "rejected": str, ...}``:

    - explicit prompt: ``prompt`` + ``chosen``/``rejected`` as strings or assistant message lists;
    - implicit prompt: ``chosen``/``rejected`` as whole conversations — message lists sharing every
      turn but the last, or HH-RLHF ``\\n\\nHuman: … \\n\\nAssistant: …`` transcripts split at the
      last Assistant turn of their shared prefix (``split_hh_pair``).

    Extra columns pass through. Bad rows raise ``DataError`` naming file, row and field.
    """
    rows, name = _read_source(source, split, config, name)
    out = []
    for i, row in enumerate(rows):
        where = f"{name}: row {i}"
        for field in ("chosen", "rejected"):
            value = row.get(field)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"{where}: field {field!r} is missing or empty (offline dpo needs prompt, chosen, rejected)")
        c, r = row["chosen"], row["rejected"]
        if column in row:
            prompt, chosen, rejected = row[column], _response(c, where, "chosen"), _response(r, where, "rejected")
        elif isinstance(c, str) and isinstance(r, str):
            try:
                text, chosen, rejected = split_hh_pair(c, r)
            except ValueError as e:
                raise DataError(f"{where}: fields 'chosen'/'rejected': {e}; give a {column!r} field instead") from None
            prompt = transcript_to_messages(text)
            if not prompt or prompt[-1]["role"] != "user":
                raise DataError(f"{where}: field 'chosen': the shared prefix does not end with a Human turn")
        elif isinstance(c, list) and isinstance(r, list):
            if c[:-1] != r[:-1] or not c[:-1]:
                raise DataError(f"{where}: fields 'chosen'/'rejected': conversations must share every turn but the last "
                                f"(the prompt); give a {column!r} field instead")
            prompt, chosen, rejected = c[:-1], _response(c, where, "chosen"), _response(r, where, "rejected")
        else:
            raise DataError(f"{where}: field {column!r} is missing and chosen/rejected are not whole conversations")
        check_prompt(prompt, where, column)
        if chosen == rejected:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
        out.append({**row, "prompt": prompt, "chosen": chosen, "rejected": rejected})
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
