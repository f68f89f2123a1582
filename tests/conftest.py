"""Shared pytest fixtures. Tiny models are built once per session (see tests/tiny.py); tests that
train copy nothing, they only read these folders."""

from __future__ import annotations

import contextlib

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import tiny` from any test module


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


@contextlib.contextmanager
def serve_judge(tmp_dir, args: list[str], ready_path: str, timeout_s: float):
    """Run `daralign serve-judge ARGS` on a free loopback port until the block ends; yields
    {base_url, model, log} once GET ready_path answers 200."""
    import os
    import signal
    import subprocess
    import time

    import httpx

    port = free_port()
    log = tmp_dir / "serve.log"
    cmd = [sys.executable, "-m", "daralign.cli", "serve-judge", "--port", str(port), *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve-judge exited early:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"serve-judge did not come up in {timeout_s} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        model = next(line.split("model: ", 1)[1].strip() for line in log.read_text().splitlines() if line.startswith("model: "))
        yield {"base_url": f"http://127.0.0.1:{port}/v1", "model": model, "log": log}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def smol_judge_server(tmp_path_factory):
    """`daralign serve-judge --engine transformers` with SmolLM2-135M on a free loopback port,
    started once per session: {base_url, model, log}. Plumbing only (SmolLM2 judges at chance)."""
    with serve_judge(tmp_path_factory.mktemp("serve"), ["--engine", "transformers", "--model",
                     "bundled:smollm2-135m-instruct", "--dtype", "float32"], "/health", 300) as server:
        yield server

def undocumented_metrics(rows: list[dict]) -> set[str]:
    """Keys of metrics.jsonl rows that docs/metrics.md does not list (``<x>`` there matches a name)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    names = re.findall(r"`([a-z_<>/]+[a-z_<>0-9]*)`", text)
    patterns = [re.compile("^" + re.sub(r"<[a-z_]+>", r"[^/]+", re.escape(n).replace(r"\<", "<").replace(r"\>", ">")) + "$")
                for n in names]
    return {k for row in rows for k in row if not any(p.match(k) for p in patterns)}
