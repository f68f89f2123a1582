"""`daralign annotate` (label a jsonl file outside training) and `daralign serve-judge` (a local
OpenAI-compatible judge server on 127.0.0.1).

    daralign annotate --annotator judge.yaml --input rows.jsonl --output out.jsonl
    daralign serve-judge --model bundled:qwen2.5-coder-0.5b-instruct --port 8080

serve-judge only assembles and runs one of these one-liners (``--print_command`` shows it):

    python -m llama_cpp.server --model judge.gguf --host 127.0.0.1 --port 8080     # pip install 'llama-cpp-python[server]'
    transformers serve ~/.cache/daralign/models/qwen2.5-coder-0.5b-instruct --host 127.0.0.1 --port 8080 --device cpu

then point a judge at it: ``backend: openai``, ``base_url: http://127.0.0.1:8080/v1`` and the
``model`` name it prints. The llama.cpp server returns top log-probabilities (scores are
probabilities); ``transformers serve`` ignores ``logprobs``, so labels are parsed from text.

Score rows are ``{prompt, completion}`` and get ``score``; compare rows are ``{prompt,
completion_a, completion_b}`` and get ``prob_a``. Invalid labels are written as ``null`` with
``valid: false``. The output file appears only when complete (written to a temp file, then
renamed), and with a ``cache:`` in the annotator config a rerun after a crash pays only for the
rows it had not reached.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from daralign.core.errors import ConfigError, DataError

def load_annotator_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--annotator: file not found: {path}")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if isinstance(cfg, dict) and isinstance(cfg.get("annotator"), dict):  # a train config's section
        cfg = cfg["annotator"]
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping of annotator fields")
    return cfg


def read_rows(path: str) -> tuple[list[dict], str]:
    """Rows of a jsonl file and their kind ('score' or 'compare'); errors name file, line, field."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--input: file not found: {path}")
    rows, kind = [], None
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: a row must be a JSON object")
            this = "compare" if ("completion_a" in row or "completion_b" in row) else "score"
            need = ["prompt"] + (["completion"] if this == "score" else ["completion_a", "completion_b"])
            for key in need:
                if key not in row:
                    raise DataError(f"{path}:{n}: missing field {key!r} (score rows: prompt, completion; compare rows: prompt, completion_a, completion_b)")
            for key in need[1:]:
                if not isinstance(row[key], str):
                    raise DataError(f"{path}:{n}: field {key!r} must be a string")
            if not isinstance(row["prompt"], (str, list)):
                raise DataError(f"{path}:{n}: field 'prompt' must be a string or a list of chat messages")
            if kind is not None and this != kind:
                raise DataError(f"{path}:{n}: mixes {this} rows with {kind} rows; use one kind per file")
            kind = this
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows, kind  # type: ignore[return-value]


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers never see half a file."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def annotate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="daralign annotate", formatter_class=argparse.ArgumentDefaultsHelpFormatter, description="Score or compare rows of a jsonl file with an annotator.")
    ap.add_argument("--annotator", required=True, help="YAML file with the annotator config (e.g. type: judge ...)")
    ap.add_argument("--input", required=True, help="jsonl rows {prompt, completion} or {prompt, completion_a, completion_b}")
    ap.add_argument("--output", required=True, help="jsonl output (input rows + score | prob_a, valid)")
    ap.add_argument("--chunk", type=int, default=64, help="rows per annotator call (progress is cached per chunk)")
    args = ap.parse_args(argv)
    if args.chunk < 1:
        raise ConfigError("--chunk must be >= 1")

    cfg = load_annotator_yaml(args.annotator)
    rows, kind = read_rows(args.input)
    if cfg.get("type") == "judge" and cfg.get("mode", "score") != kind:
        raise DataError(f"{args.input}: has {kind} rows but the judge in {args.annotator} has mode {cfg.get('mode', 'score')!r}")
    from daralign.annotators.build import build_annotator

    annotator = build_annotator(cfg)
    out_rows, n_invalid = [], 0
    try:
        for start in range(0, len(rows), args.chunk):
            part = rows[start : start + args.chunk]
            prompts = [r["prompt"] for r in part]
            if kind == "score":
                res = annotator.score(prompts, [r["completion"] for r in part], part)
                labels, field = res.scores, "score"
            else:
                res = annotator.compare(prompts, [r["completion_a"] for r in part], [r["completion_b"] for r in part], part)
                labels, field = res.prob_a, "prob_a"
            for r, v in zip(part, labels):
                out_rows.append({**r, field: v, "valid": v is not None})
                n_invalid += v is None
        totals = getattr(annotator, "totals", {})
        mean_lat = totals["latency_s"] / totals["paid"] if totals.get("paid") else 0.0
        hits, requests = annotator.num_cache_hits, annotator.num_requests
    finally:
        annotator.close()
    write_jsonl_atomic(args.output, out_rows)
    print(f"annotate: rows={len(out_rows)} invalid={n_invalid} requests={requests} cache_hits={hits}/{hits + requests} "
          f"mean_latency_s={mean_lat:.3f} -> {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------
# serve-judge


def _engines() -> list[str]:
    found = []
    if importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("llama_cpp.server") is not None:
        found.append("llama_cpp")
    if importlib.util.find_spec("fastapi") is not None and importlib.util.find_spec("uvicorn") is not None:
        found.append("transformers")
    return found


def serve_command(model: str, port: int, engine: str = "auto", n_ctx: int = 4096, dtype: str = "auto") -> tuple[list[str], str]:
    """(argv of the server process, the ``model`` name clients must send)."""
    from daralign.core import bundled

    available = _engines()
    if engine == "auto":
        if not available:
            raise ConfigError("serve-judge: no server engine installed; pip install 'llama-cpp-python[server]' "
                              "(compiles ~8 min) or 'transformers[serving]' (no compile)")
        engine = available[0]
    elif engine not in ("llama_cpp", "transformers"):
        raise ConfigError(f"serve-judge --engine: {engine!r} is not auto, llama_cpp or transformers")
    elif engine not in available:
        hint = "llama-cpp-python[server]" if engine == "llama_cpp" else "transformers[serving]"
        raise ConfigError(f"serve-judge --engine {engine}: not installed; pip install '{hint}'")
    if engine == "llama_cpp":
        gguf = str(bundled.gguf_path(model)) if bundled.is_bundled(model) else model
        if not gguf.endswith(".gguf") or not Path(gguf).is_file():
            raise ConfigError(f"serve-judge --model: engine llama_cpp needs a .gguf file or bundled:NAME, got {model!r}")
        alias = Path(gguf).stem
        return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", alias, "--host", "127.0.0.1",
                "--port", str(port), "--n_ctx", str(n_ctx)], alias  # logits_all (server default) enables logprobs
    # transformers serve: bundled models are served from their converted safetensors folder.
    if bundled.is_bundled(model):
        where = bundled.resolve(model)
    elif model.endswith(".gguf"):
        if not Path(model).is_file():
            raise ConfigError(f"serve-judge --model: GGUF file not found: {model}")
        where = f"{Path(model).resolve().parent}:{Path(model).name}"
    else:
        where = model
    exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    return [exe, "serve", where, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", dtype], where


def serve_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog="daralign serve-judge",
        description="Serve a judge model on 127.0.0.1 with an OpenAI-compatible API (llama.cpp server or transformers serve).",
    )
    ap.add_argument("--model", default="bundled:qwen2.5-coder-0.5b-instruct", help="bundled:NAME, a .gguf file, or a model folder")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--engine", default="auto", help="auto (llama_cpp if installed, else transformers) | llama_cpp | transformers")
    ap.add_argument("--n_ctx", type=int, default=4096, help="llama_cpp context length (default: 4096)")
    ap.add_argument("--dtype", default="auto", help="transformers serve dtype (auto, bfloat16, float32)")
    ap.add_argument("--print_command", action="store_true", help="print the server command and judge config, do not start")
    args = ap.parse_args(argv)
    if not (0 < args.port < 65536):
        raise ConfigError(f"serve-judge --port: {args.port} is not a TCP port")
    cmd, name = serve_command(args.model, args.port, args.engine, args.n_ctx, args.dtype)
    snippet = (f"type: judge\nbackend: openai\nbase_url: http://127.0.0.1:{args.port}/v1\nmodel: {name}\n")
    print("server: " + " ".join(cmd))
    print("judge config:\n" + snippet, flush=True)
    if args.print_command:
        return 0
    # this process *becomes* the server (as `vllm-serve` does): a signal to it reaches the server,
    # and no server is left running when whoever started `serve-judge` stops it
    os.execv(cmd[0], cmd)
