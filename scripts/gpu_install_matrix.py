"""Does `pip install 'daralign[vllm]'` resolve on a CUDA Linux machine? Asks pip, without
installing anything: the built daralign wheel, `--dry-run --only-binary=:all:`, the manylinux
x86_64 platform tags and each Python version, CUDA builds only (a CPU torch build lying on this
machine's disk is excluded, as a GPU machine would not have it). Writes what resolved, per Python,
to a JSON file (docs/gpu-install-matrix.json) and prints it as the table in docs/gpu.md.

    python scripts/gpu_install_matrix.py --json docs/gpu-install-matrix.json   # ~1 min per Python

It reaches the package index (PyPI): run it where pip can.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.10", "3.11", "3.12")
# manylinux_2_17 (CentOS 7) up to 2_39: every glibc tag a current x86_64 distribution accepts
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "linux_x86_64"]
SHOWN = ("vllm", "torch", "transformers", "accelerate", "peft", "datasets", "safetensors", "triton",
         "nvidia-nccl-cu13", "flashinfer-python", "xgrammar")


def build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(out)], check=True)
    return next(out.glob("daralign-*.whl"))


def resolve(wheel: Path, python: str, work: Path) -> dict:
    """pip's resolution of ``wheel[vllm]`` for CPython ``python`` on manylinux x86_64: {name: version}."""
    report = work / f"report-{python}.json"
    no_cpu_builds = work / "cuda-only.txt"
    no_cpu_builds.write_text("torch!=2.13.0+cpu\n")  # the CPU wheel on this project's machines
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--target", str(work / "target"),
           "--report", str(report), "-c", str(no_cpu_builds), "--quiet"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    done = subprocess.run(cmd + [f"{wheel}[vllm]"], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"pip exited {done.returncode}"}
    installed = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, help="write the resolutions here")
    p.add_argument("--pythons", nargs="+", default=list(PYTHONS), help="CPython versions to resolve for")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wheel = build_wheel(work / "dist")
        matrix = {python: resolve(wheel, python, work) for python in a.pythons}
    pip_version = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()[1]
    result = {"date": datetime.date.today().isoformat(), "pip": pip_version, "platforms": PLATFORMS,
              "requirement": "daralign[vllm]", "resolved": matrix}
    print("| Python | " + " | ".join(SHOWN) + " |")
    print("|---" * (len(SHOWN) + 1) + "|")
    for python, found in matrix.items():
        cells = [found.get(name, "—") for name in SHOWN] if "error" not in found else [f"does not resolve: {found['error']}"]
        print(f"| {python} | " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"written: {a.json}")
    return 0 if all("error" not in found for found in matrix.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
