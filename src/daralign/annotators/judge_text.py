"""What an LLM judge reads and writes, as text: rating scales, prompt templates (with the
injection-safe pasting of prompts and responses) and reading a label out of the judge's answer.
The annotator that sends requests and turns replies into labels is ``judge.py``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daralign.core.errors import AnnotationError, ConfigError

TEMPLATE_DIR = Path(__file__).parent / "templates"


# ---------------------------------------------------------------------------------------------
# scales


@dataclass(frozen=True)
class Scale:
    labels: tuple[str, ...]
    values: tuple[float, ...]
    kind: str  # yes_no | numeric | custom

    @property
    def answer_format(self) -> str:
        if self.kind == "yes_no":
            return "Answer with a single word: Yes or No."
        if self.kind == "numeric":
            lo, hi = self.labels[0], self.labels[-1]
            return f"Rate it on a scale from {lo} to {hi} ({lo} = not at all, {hi} = completely). Answer with the number only."
        return "Answer with a single word, one of: " + ", ".join(self.labels) + "."

    @property
    def multi_digit(self) -> bool:
        return self.kind == "numeric" and any(len(lab) > 1 for lab in self.labels)

    def spec(self) -> Any:
        return dict(zip(self.labels, self.values))


def parse_scale(scale: Any) -> Scale:
    if scale == "yes_no":
        return Scale(("Yes", "No"), (1.0, 0.0), "yes_no")
    if isinstance(scale, str) and (m := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", scale)):
        lo, hi = int(m[1]), int(m[2])
        if not (lo < hi <= 99):
            raise ConfigError(f"judge config field 'scale': {scale!r} needs LO < HI <= 99")
        return Scale(tuple(str(v) for v in range(lo, hi + 1)), tuple(float(v) for v in range(lo, hi + 1)), "numeric")
    if isinstance(scale, dict) and len(scale) >= 2:
        labels = tuple(str(k).strip() for k in scale)
        vals = tuple(scale.values())
        ok = all(lab and " " not in lab for lab in labels) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals
        )
        if ok and len(set(lab.lower() for lab in labels)) == len(labels):
            return Scale(labels, tuple(float(v) for v in vals), "custom")
    raise ConfigError(
        f"judge config field 'scale': {scale!r} is not 'yes_no', a range like '1-10', or a mapping "
        "of at least two distinct one-word labels to finite numbers"
    )


# ---------------------------------------------------------------------------------------------
# templates


_FIELD = re.compile(r"\{(prompt|response|response_a|response_b|answer_format)\}")
_TAG = re.compile(r"<(\s*/?\s*(?:conversation|response(?:_a|_b)?)\b)", re.IGNORECASE)


def template_names() -> list[str]:
    return sorted({p.name.split(".")[0] for p in TEMPLATE_DIR.glob("*.*.txt")})


def load_template(template: str, mode: str) -> str:
    """Text of the template ``template`` (a name in templates/ or a file path) for ``mode``."""
    if not isinstance(template, str) or not template:
        raise ConfigError(f"judge config field 'template': must be a name or a file path (got {template!r})")
    builtin = TEMPLATE_DIR / f"{template}.{mode}.txt"
    if "/" not in template and "\\" not in template and builtin.is_file():
        text = builtin.read_text(encoding="utf-8")
    elif Path(template).expanduser().is_file():
        text = Path(template).expanduser().read_text(encoding="utf-8")
    else:
        raise ConfigError(
            f"judge config field 'template': {template!r} is neither a built-in {mode} template "
            f"({', '.join(template_names())}) nor an existing file"
        )
    needed = ["{prompt}"] + (["{response}"] if mode == "score" else ["{response_a}", "{response_b}"])
    missing = [f for f in needed if f not in text]
    if missing:
        raise ConfigError(f"judge config field 'template': {template!r} lacks {', '.join(missing)} for mode {mode!r}")
    return text


def neutralise(text: str) -> str:
    """Escape look-alikes of the template's delimiter tags so pasted text cannot close them."""
    return _TAG.sub(r"&lt;\1", text)


def render(template: str, **values: str) -> str:
    """Fill ``{field}`` placeholders in one pass (pasted text is never re-scanned, so braces or
    placeholders inside a response stay literal)."""
    return _FIELD.sub(lambda m: values.get(m[1], m[0]), template)


def format_prompt(prompt: Any) -> str:
    """A prompt as text: strings as-is, chat messages as a 'Role: content' transcript."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt):
        return "\n\n".join(f"{str(m.get('role', 'user')).capitalize()}: {m['content']}" for m in prompt)
    raise AnnotationError(f"judge: a prompt must be a string or a list of {{role, content}} messages, got {type(prompt).__name__}")


def fit_prompt(text: str, max_chars: int) -> tuple[str, bool]:
    """The end of a long prompt (what the response answers), marked as cut; (text, was it cut)."""
    if len(text) <= max_chars:
        return text, False
    return "[…] " + text[len(text) - max_chars:], True


# ---------------------------------------------------------------------------------------------
# parsing the judge's text


def parse_label(text: str | None, labels: tuple[str, ...]) -> str | None:
    """The scale label the judge's answer starts with (after punctuation/markup and an optional
    'Answer:'/'Score:'/'Response' lead-in), or None. Only the judge's output is parsed."""
    if not text:
        return None
    head = re.sub(r"^[\s\W_]*(?:(?:final\s+)?(?:answer|score|rating|verdict|response)\s*[:=\-]?\s*)?[\s\[\(\*\"'“]*", "",
                  text.strip(), flags=re.IGNORECASE)
    m = re.match(r"([A-Za-z]+|\d+)", head)
    if not m:
        return None
    word = m[1].lower()
    for lab in labels:
        if lab.lower() == word:
            return lab
    return None
