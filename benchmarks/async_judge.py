"""What ``async_steps`` buys with a hosted judge's latency: median step time of DAR (SmolLM2, K = 4)
at ``async_steps`` 0, 1 and 2 in one run, beside the bound ``rollout + reference + max(annotate,
update)`` read from the synchronous run's own phases.

The judge is a loopback OpenAI-compatible server (a subprocess) that answers each request after
``--latency`` seconds (by default the latency at which a step's annotation lasts as long as its
update on this machine, measured first: issue 33's setting) and serves at most
``--server_concurrency`` requests at a time (the rest queue, as a hosted API's concurrency limit
makes them); its answer is a fixed function of the response text, so every run buys the same
labels. The policy trains on the quickstart's prompts and shape (6 prompts × 4 samples, 24 new
tokens). A second pair of runs uses a judge slower than the update (``--slow_factor`` × the
latency): the trainer then waits, and the JSON shows it waiting, not spinning — its CPU seconds per
wall second while it trains.

    OMP_NUM_THREADS=2 python benchmarks/async_judge.py --json docs/img/performance/async_judge_xeon.json \
        --plot docs/img/performance/async_judge_xeon.png
    python benchmarks/async_judge.py --replot --json docs/img/performance/async_judge_xeon.json \
        --plot docs/img/performance/async_judge_xeon.png

Goal (issue 33): ``async_steps: 1`` ≤ 0.65 of the synchronous step time, and within 10% of the bound.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRAIN = 2  # the deepest pipeline measured


# ---------------------------------------------------------------- the judge server (a subprocess)
def serve(port_file: str, latency: float, concurrency: int) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    slots = threading.BoundedSemaphore(concurrency)

    class Judge(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            text = body["messages"][-1]["content"]
            with slots:  # a hosted API's concurrency limit: the rest wait their turn
                time.sleep(latency)
            verdict = "Yes" if hashlib.sha256(text.encode()).digest()[0] % 2 else "No"
            data = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": verdict}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    server.daemon_threads = True
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


class JudgeServer:
    def __init__(self, latency: float, concurrency: int, tmp: Path) -> None:
        port_file = tmp / f"port-{latency}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--_serve", str(port_file), str(latency), str(concurrency)])
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the loopback judge server did not start")
            time.sleep(0.05)
        self.base_url = f"http://127.0.0.1:{port_file.read_text()}/v1"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ---------------------------------------------------------------- one training run
def run(base_url: str, async_steps: int, steps: int, client_concurrency: int, tmp: Path) -> dict:
    out = tmp / f"run-{async_steps}-{time.monotonic_ns()}"
    judge = {"type": "judge", "mode": "score", "template": "tone", "backend": "openai", "base_url": base_url,
             "model": "hosted", "use_logprobs": False, "max_retries": 0, "timeout_s": 120,
             "max_concurrency": client_concurrency}
    cfg = tmp / "judge.yaml"
    cfg.write_text(json.dumps(judge))
    cmd = [sys.executable, "-m", "daralign.cli", "train", "--config", str(REPO / "examples" / "quickstart.yaml"),
           "--annotator", str(cfg), "--eval_dataset", "", "--with_control", "false", "--report", "false",
           "--save_strategy", "no", "--max_steps", str(steps), "--async_steps", str(async_steps),
           "--output_dir", str(out)]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    requests_per_step = rows[0]["annotation_requests"]  # step 1's: the counter is cumulative
    # step 1 is a warm-up, and the last DRAIN steps sample nothing ahead (max_steps ends the pipeline):
    # every level is measured on the same steps in between, where its pipeline is full
    rows = rows[1:len(rows) - DRAIN]
    med = lambda key: statistics.median(r.get(key, 0.0) for r in rows)  # noqa: E731
    return {"async_steps": async_steps, "steps_measured": len(rows), "step_time_median": med("step_time"),
            "step_times": [r["step_time"] for r in rows],
            **{f"{k}_median": med(f"timing/{k}") for k in ("rollout", "annotate", "reference", "update")},
            "wait_annotate_median": med("async/wait_annotate"), "wait_rollout_median": med("async/wait_rollout"),
            "staleness": [r.get("async/staleness", 0.0) for r in rows],
            "requests_per_step": requests_per_step,
            "process_cpu_s_per_wall_s": (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall}


def calibrate(server_concurrency: int, client_concurrency: int, tmp: Path) -> dict:
    """The latency at which a step's annotation lasts as long as its update here: the update's median
    from a short synchronous run with an instant judge, spread over the waves of requests the
    judge's concurrency cap makes (a step's requests ÷ the cap, rounded up)."""
    server = JudgeServer(0.0, server_concurrency, tmp)
    try:
        fast = run(server.base_url, 0, 3 + DRAIN, client_concurrency, tmp)
    finally:
        server.close()
    waves = math.ceil(fast["requests_per_step"] / min(server_concurrency, client_concurrency))
    return {"update_median_s": fast["update_median"], "requests_per_step": fast["requests_per_step"], "waves": waves,
            "latency_s": round(fast["update_median"] / waves, 3)}


def bound(sync: dict) -> float:
    """rollout + reference + max(annotate, update): annotation hidden behind the update."""
    return sync["rollout_median"] + sync["reference_median"] + max(sync["annotate_median"], sync["update_median"])


def ideal(sync: dict) -> float:
    """max(rollout + reference + update, annotate): what this pipeline can reach, since a batch's
    labels are bought while the trainer samples the next batch *and* updates (sampling ahead comes
    first in a step), so annotation hides behind all three."""
    return max(sync["rollout_median"] + sync["reference_median"] + sync["update_median"], sync["annotate_median"])


def plot(result: dict, path: str) -> None:
    """Median step time per ``async_steps``, one group per judge, the bound and the ideal as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(result["runs"].items())
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), sharey=True)
    for ax, (name, entry) in zip(axes, groups):
        levels = [str(r["async_steps"]) for r in entry["runs"]]
        ax.bar(levels, [r["step_time_median"] for r in entry["runs"]], color="tab:blue")
        ax.axhline(entry["bound_s"], color="tab:red", ls="--", label="bound: rollout + reference + max(annotate, update)")
        ax.axhline(entry["ideal_s"], color="tab:green", ls=":", label="ideal: max(rollout + reference + update, annotate)")
        ax.set(title=f"{name}\n({entry['latency_s']:.2f} s a request)", xlabel="async_steps")
    axes[0].set_ylabel("median step time (s)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"DAR, SmolLM2, K = 4, on {result['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def latency_arg(value: str) -> str | float:
    """``auto`` or seconds (argparse turns a ValueError into its one-line usage error)."""
    return value if value == "auto" else float(value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--latency", default="auto", type=latency_arg, help="seconds the judge takes per request; auto: the latency at which "
                   "annotating a step takes as long as its update on this machine (issue 33's setting), from a short "
                   "synchronous run with an instant judge")
    p.add_argument("--server_concurrency", type=int, default=4, help="requests the judge serves at once")
    p.add_argument("--client_concurrency", type=int, default=8, help="the judge client's max_concurrency")
    p.add_argument("--slow_factor", type=float, default=3.0, help="the slow judge's latency, in multiples of --latency")
    p.add_argument("--steps", type=int, default=7, help=f"steps a run; the first (warm-up) and the last {DRAIN} are not counted")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a bar plot of the results here (PNG)")
    p.add_argument("--replot", action="store_true", help="measure nothing: plot the results already in --json")
    a = p.parse_args(argv)
    if a.steps < 2 + DRAIN:
        p.error(f"--steps must be at least {2 + DRAIN}: step 1 warms up and the last {DRAIN} are not counted")
    if a.replot:
        plot(json.loads(Path(a.json).read_text()), a.plot)
        return 0
    from daralign.core.provenance import cpu

    result = {"what": __doc__.split("\n\n")[0], "cpu": cpu(), "settings": {k: v for k, v in vars(a).items()
                                                                            if k not in ("json", "plot", "replot")}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if a.latency == "auto":
            result["calibration"] = calibrate(a.server_concurrency, a.client_concurrency, Path(tmp))
            base = result["calibration"]["latency_s"]
            print(f"calibration: the update takes {result['calibration']['update_median_s']:.2f} s; "
                  f"{result['calibration']['waves']} waves of requests a step → {base:.3f} s a request")
        else:
            base = a.latency
        for name, latency, levels in (("judge about as slow as the update", base, (0, 1, 2)),
                                      ("judge slower than the update", base * a.slow_factor, (0, 1))):
            server = JudgeServer(latency, a.server_concurrency, Path(tmp))
            try:
                runs = [run(server.base_url, n, a.steps, a.client_concurrency, Path(tmp)) for n in levels]
            finally:
                server.close()
            sync = runs[0]
            entry = {"latency_s": latency, "runs": runs, "bound_s": bound(sync), "ideal_s": ideal(sync),
                     "ratio_to_ideal": {r["async_steps"]: r["step_time_median"] / ideal(sync) for r in runs},
                     "ratio_to_sync": {r["async_steps"]: r["step_time_median"] / sync["step_time_median"] for r in runs},
                     "ratio_to_bound": {r["async_steps"]: r["step_time_median"] / bound(sync) for r in runs}}
            result["runs"][name] = entry
            print(f"{name} ({latency:.2f} s a request): bound {entry['bound_s']:.2f} s, ideal {entry['ideal_s']:.2f} s; " + "; ".join(
                f"async_steps {r['async_steps']}: {r['step_time_median']:.2f} s a step "
                f"({entry['ratio_to_sync'][r['async_steps']]:.2f} of sync, {entry['ratio_to_bound'][r['async_steps']]:.2f} "
                f"of the bound; waited {r['wait_annotate_median']:.2f} s for labels; "
                f"{r['process_cpu_s_per_wall_s']:.2f} CPU s per s)" for r in runs))
    one = result["runs"]["judge about as slow as the update"]
    result["goal"] = {"async1_over_sync": one["ratio_to_sync"][1], "async1_over_bound": one["ratio_to_bound"][1],
                      "met": one["ratio_to_sync"][1] <= 0.65 and one["ratio_to_bound"][1] <= 1.10}
    print(f"goal (async_steps 1 ≤ 0.65 of sync and ≤ 1.10 of the bound): {result['goal']}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    if a.plot:
        plot(result, a.plot)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--_serve":
        serve(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
