"""Shared pytest fixtures. Tiny models are built once per session (see tests/tiny.py); tests that
train copy nothing, they only read these folders."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import tiny` from any test module

# The processes the tests start (training runs killed and resumed, DDP workers, servers) share the
# few cores with this process: their OpenMP threads wait for work asleep, not spinning on a core
# another process needs. Set after torch has loaded here, so this process keeps OpenMP's default:
# the real-model training it runs itself was slower with sleeping threads (the quickstart test:
# 22-25 s against 28 s, quiet, on an AMD EPYC with AVX512-BF16).
import torch  # noqa: E402,F401  (OpenMP reads OMP_WAIT_POLICY once, when torch loads it)

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """A ``save_pretrained`` folder: random 2-layer Llama (EOS made likely) + ChatML BPE tokenizer."""
    import tiny

    return tiny.save_policy(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(scope="session")
def tiny_policy(tiny_policy_dir):
    """(model, tokenizer) loaded from ``tiny_policy_dir`` through daralign's own loaders."""
    from daralign.core.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_policy_dir)), load_tokenizer(str(tiny_policy_dir))


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory) -> Path:
    """A random ``LlamaForSequenceClassification(num_labels=1)`` with its OWN tokenizer and
    bracket-style chat template (different from the policy's ChatML)."""
    import tiny

    return tiny.save_reward_model(tmp_path_factory.mktemp("tiny_rm"))


@pytest.fixture(scope="session")
def tiny_prompts_file(tmp_path_factory) -> Path:
    """Six prompts (strings and chat messages) with an extra pass-through column."""
    import tiny

    rows = [{"prompt": p, "target": i} for i, p in enumerate(tiny.PROMPTS)]
    return tiny.write_jsonl(tmp_path_factory.mktemp("tiny_data") / "prompts.jsonl", rows)


# ---------------------------------------------------------------------------------------------
# Judge fixtures (issue 3): real servers on 127.0.0.1 and one loaded judge per session, no mocks.


def free_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening (bound then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reserved_port() -> int:
    """A free 127.0.0.1 port below the kernel's ephemeral range, for a server that binds it tens of
    seconds later: a port the kernel hands out meanwhile (a bind to port 0, an outgoing connection)
    comes from that range, so it cannot be this one."""
    import random
    import socket

    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    for port in random.sample(range(max(1024, low - 10000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def chat_reply(text: str, top: dict[str, float] | None = None, tokens: int = 7) -> dict:
    """An OpenAI chat.completion body; ``top`` (token -> logprob) adds first-token log-probs."""
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
    if top is not None:
        first = max(top, key=top.get)
        choice["logprobs"] = {"content": [{"token": first, "logprob": top[first],
                                           "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]}]}
    return {"id": "x", "object": "chat.completion", "choices": [choice],
            "usage": {"prompt_tokens": tokens - 1, "completion_tokens": 1, "total_tokens": tokens}}


class JudgeHTTPServer:
    """A real stdlib HTTP server on 127.0.0.1 speaking just enough of the OpenAI API for protocol
    and fault tests. ``handler(path, body, n) -> (status, body dict | bytes, headers)`` where n
    counts requests from 1; the default answers "Yes". Every request is recorded in ``requests``
    as (path, body, headers)."""

    def __init__(self):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.requests: list[tuple[str, dict, dict]] = []
        self.handler = lambda path, body, n: (200, chat_reply("Yes"), {})
        self._lock = threading.Lock()

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output quiet
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                with outer._lock:
                    outer.requests.append((self.path, body, dict(self.headers)))
                    n = len(outer.requests)
                status, payload, headers = outer.handler(self.path, body, n)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def keyword_judge(path, body, n):
    """A judge server handler that reads its request: in a comparison it prefers the response with
    more 'e's; a single response is "Yes" if it has an 'e'. Deterministic and real over HTTP."""
    import re

    text = body["messages"][-1]["content"]
    if "<response_a>" in text:
        a, b = (re.search(rf"<{t}>\n(.*?)\n</{t}>", text, re.S).group(1) for t in ("response_a", "response_b"))
        return 200, chat_reply("A" if a.count("e") >= b.count("e") else "B"), {}
    return 200, chat_reply("Yes" if "e" in text.split("<response>")[-1] else "No"), {}


def http_judge(server, mode: str = "score", **over) -> dict:
    """A `type: judge` config for a JudgeHTTPServer on 127.0.0.1 (text answers, no retries)."""
    return {"type": "judge", "mode": mode, "template": "tone", "backend": "openai", "base_url": server.base_url,
            "model": "m", "use_logprobs": False, "max_retries": 0, "timeout_s": 5, **over}


@pytest.fixture
def judge_http():
    server = JudgeHTTPServer()
    yield server
    server.close()


@pytest.fixture(scope="session", autouse=True)
def judges_loaded_once():
    """Every in-process judge model (``backend: transformers``) is loaded once per session: a judge
    built the same way as an earlier one, in any test or any `daralign` command run in-process,
    takes the loaded model (``keep_loaded``: the three most recent)."""
    from daralign.annotators.backends import keep_loaded

    with keep_loaded(max_idle=3, backends=("transformers",)):
        yield


@pytest.fixture(scope="session")
def qwen_judge_client(judges_loaded_once):
    """The bundled Qwen2.5-Coder-0.5B judge as a judge config's defaults load it (``dtype: auto``:
    bf16 only on CPUs with bf16 units; elsewhere fp32, ~2x faster for the same scores)."""
    from daralign.annotators.backends import acquire_client, release_client
    from daralign.annotators.judge import JudgeConfig

    key, client = acquire_client(JudgeConfig())
    yield client
    release_client(key)


class LoopbackServer:
    """A server process of the tests' own on a free 127.0.0.1 port, in a session of its own: started
    at once, waited for when a test needs it, stopped with everything it started."""

    def __init__(self, command: list[str], ready_path: str, env: dict | None = None) -> None:
        import subprocess
        import tempfile

        self.port, self.ready_path = reserved_port(), ready_path
        self.log = Path(tempfile.mkdtemp(prefix="daralign-test-server-")) / "server.log"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "daralign.cli", *command, "--port", str(self.port)],
                                         stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=None if env is None else os.environ | env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, timeout_s: float) -> "LoopbackServer":
        """Until GET ready_path answers 200; a server that exits or never answers fails the test with its log."""
        import time

        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.proc.args[3]} exited while starting:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{self.proc.args[3]} did not answer {self.ready_path} in {timeout_s} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)

    def stop(self) -> None:
        """SIGTERM to the server (vLLM's stops its engine processes), then SIGKILL to what is left of its session."""
        import shutil
        import signal
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.log.parent, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """A test server: the ``daralign`` command that runs it (its port is added), the path that
    answers 200 once it takes requests, extra environment, and whether it can run here."""

    command: list[str]
    ready_path: str
    env: dict | None = None
    runs_here: Callable[[], bool] = lambda: True

    def start(self) -> "LoopbackServer":
        return LoopbackServer(self.command, self.ready_path, self.env)


# The servers the tests start, by fixture name. One a selected test uses is started as soon as
# collection ends, so its start-up (vLLM's is ~30 s of imports and engine set-up) overlaps the tests
# that run before it. The transformers and vLLM servers run one OpenMP thread: they start beside the
# first tests, on one core of two, and their requests are small (SmolLM2's judge server spent 12 s of
# CPU on test_clients_server.py with one thread, 17 s with two, quiet, on an AMD EPYC with AVX512-BF16).
SERVERS = {
    "smol_judge_server": ServerSpec(["serve-judge", "--engine", "transformers", "--model", "bundled:smollm2-135m-instruct",
                                     "--dtype", "float32"], "/health", {"OMP_NUM_THREADS": "1"}),
    "llama_server": ServerSpec(["serve-judge", "--engine", "llama_cpp", "--model", "bundled:qwen2.5-coder-0.5b-instruct",
                                "--n-ctx", "2048"], "/v1/models",
                               runs_here=lambda: importlib.util.find_spec("llama_cpp") is not None),
    # 1 GiB of KV cache: plenty for a few short sequences; its thread not pinned (vLLM pins a thread to every core by default)
    "vllm_server": ServerSpec(["vllm-serve", "--model", "bundled:smollm2-135m-instruct", "--dtype", "float32",
                               "--max_model_len", "512", "--weight_transfer", "gloo"], "/health",
                              {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"},
                              runs_here=lambda: importlib.util.find_spec("vllm") is not None),
}
_started: dict[str, LoopbackServer] = {}


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    used = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    for name, spec in SERVERS.items():
        if name in used and spec.runs_here():
            _started[name] = spec.start()
    # Every test module is imported now, and with them torch, transformers, accelerate, ...: 430 k
    # objects that live as long as this process. Frozen (moved out of the cyclic garbage collector's
    # sight, as vLLM does in its engine), they are no longer scanned by every full collection: compare's
    # after each run, accelerate's, Python's own. Each took 0.24 s here, 0.5 s once vLLM and TRL are
    # imported too; test_compare.py and test_testbed.py ran in 16-18 s against 21-23 s (AMD EPYC with
    # AVX512-BF16, quiet). Collected first, so no garbage is frozen with them.
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session):
    for server in _started.values():  # started for tests that did not run (a -x stop, a skip)
        server.stop()
    gc.unfreeze()  # collectable again as the interpreter exits (else nanobind, in triton, reports them leaked)


@contextlib.contextmanager
def loopback_server(name: str, timeout_s: float):
    """The server ``SERVERS[name]``, the one started at collection's end or else a new one, ready."""
    server = _started.pop(name, None) or SERVERS[name].start()
    try:
        yield server.wait(timeout_s)
    finally:
        server.stop()


def judge_server(server: LoopbackServer) -> dict:
    """{base_url, model, log} of a `daralign serve-judge` server (it prints the model it serves)."""
    model = next(line.split("model: ", 1)[1].strip() for line in server.log.read_text().splitlines() if line.startswith("model: "))
    return {"base_url": server.url + "/v1", "model": model, "log": server.log}


@pytest.fixture(scope="session")
def smol_judge_server():
    """`daralign serve-judge --engine transformers` with SmolLM2-135M on a free loopback port,
    started once per session: {base_url, model, log}. Plumbing only (SmolLM2 judges at chance)."""
    with loopback_server("smol_judge_server", 300) as server:
        yield judge_server(server)


def undocumented_metrics(rows: list[dict], glossary: Path | None = None) -> set[str]:
    """Keys of metrics.jsonl rows that the glossary (docs/metrics.md) does not list (``<x>`` there
    matches a name)."""
    import re

    text = (glossary or Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    names = re.findall(r"`([a-z_<>/]+[a-z_<>0-9]*)`", text)
    patterns = [re.compile("^" + re.sub(r"<[a-z_]+>", r"[^/]+", re.escape(n).replace(r"\<", "<").replace(r"\>", ">")) + "$")
                for n in names]
    return {k for row in rows for k in row if not any(p.match(k) for p in patterns)}
