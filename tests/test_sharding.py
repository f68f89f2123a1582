"""FSDP2 and DeepSpeed ZeRO-3 on two CPU processes (torchrun + gloo; torch's own ``fully_shard``,
DeepSpeed's CPU accelerator): whole weights for the push and ``final/`` gathered one tensor at a
time, HF generation in lockstep, the frozen reference sharded like the policy, the held-out check. accelerate runs FSDP
on GPUs only and DeepSpeed on CPUs as one process per rank (docs/gpu.md), so the loop's own
sharded launches are not run here; their refusals and DeepSpeed's filled config are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import importlib.util

import pytest
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

from daralign.core.errors import ConfigError
from daralign.core.sharding import check_launch, is_sharded, whole_state_dict

WORKER = Path(__file__).resolve().parent / "sharding_worker.py"


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed not installed (make install builds it: see the Makefile)")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", pytest.param("zero3", marks=needs_deepspeed)])
def test_two_processes_gather_whole_weights_generate_in_lockstep_and_shard_the_reference(mode, tmp_path, tiny_policy_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER), mode,
                           str(tiny_policy_dir), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for rank in (0, 1):
        assert (f"rank {rank}: {mode}: sharded weights, lockstep generation, the sharded reference, the held-out check "
                "and final/ ok") in proc.stdout
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_an_unsharded_model_is_its_own_whole(tiny_policy):
    model, _ = tiny_policy
    assert not is_sharded(model)
    state = whole_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    assert whole_state_dict(model, keep=False) is None


def _accelerator(fsdp=None, deepspeed=None):
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed), num_processes=2)


def test_launches_not_built_are_refused_in_one_line():
    fsdp = FullyShardedDataParallelPlugin(fsdp_version=2)
    check_launch(_accelerator(), use_peft=True, extra_modules=True)  # DDP / one process: everything goes
    check_launch(_accelerator(fsdp), use_peft=False, extra_modules=True)
    zero3 = lambda **ds: DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 3}, **ds})  # noqa: E731
    check_launch(_accelerator(deepspeed=zero3()), use_peft=True)  # LoRA under ZeRO-3: merged from gathered factors
    with pytest.raises(ConfigError, match="FSDP with LoRA"):
        check_launch(_accelerator(fsdp), use_peft=True)
    with pytest.raises(ConfigError, match="DeepSpeed with an objective that trains a module beside the policy"):
        check_launch(_accelerator(deepspeed=zero3()), use_peft=False, extra_modules=True)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be 1 or auto"):
        check_launch(_accelerator(deepspeed=zero3(gradient_accumulation_steps=4)), use_peft=False)


def test_optimizer_offload_is_refused_in_one_line():
    """DeepSpeed refuses a client optimizer (daralign's torch AdamW) with optimizer offload, at
    deepspeed.initialize after the models loaded: refused first, named as the accelerate config names
    it, however the plugin was built; DeepSpeed's own opt-in (zero_force_ds_cpu_optimizer: false) goes."""
    for device in ("cpu", "nvme"):
        plugins = [DeepSpeedPlugin(zero_stage=3, offload_optimizer_device=device),  # accelerate config's keys
                   DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 3, "offload_optimizer": {"device": device}}})]
        for plugin in plugins:
            with pytest.raises(ConfigError, match=f"offload_optimizer_device: {device} .*set offload_optimizer_device: none"):
                check_launch(_accelerator(deepspeed=plugin), use_peft=False)
    for plugin in (DeepSpeedPlugin(zero_stage=3, offload_optimizer_device="none", offload_param_device="cpu"),
                   DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                                                 "zero_force_ds_cpu_optimizer": False})):
        check_launch(_accelerator(deepspeed=plugin), use_peft=False)


def test_deepspeed_config_gets_what_accelerate_would_read_from_a_dataloader():
    """No dataloader goes through accelerate's prepare(), so the launch fills the values it would
    take from one; daralign marks the accumulation boundary itself (DeepSpeed's own stays 1)."""
    plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                                           "train_batch_size": "auto", "gradient_clipping": "auto"})
    check_launch(_accelerator(deepspeed=plugin), use_peft=False, micro_batch=16, max_grad_norm=0.5)
    config = plugin.deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] == 16 and config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 0.5 and "train_batch_size" not in config  # DeepSpeed derives it


@pytest.mark.parametrize("name, kind", [("fsdp2.yaml", "FSDP"), ("zero3.yaml", "DEEPSPEED"), ("ddp.yaml", "MULTI_GPU")])
def test_example_accelerate_configs_load(name, kind):
    """examples/accelerate/ read by accelerate's own config loader (an unknown key raises there)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).resolve().parents[1] / "examples" / "accelerate" / name))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    if kind == "FSDP":  # the values FSDP2's plugin takes, spelled as its launcher passes them
        fsdp = config.fsdp_config
        plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp["fsdp_version"], state_dict_type=fsdp["fsdp_state_dict_type"],
                                                auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
                                                reshard_after_forward=fsdp["fsdp_reshard_after_forward"])
        assert plugin.fsdp_version == 2
    if kind == "DEEPSPEED":  # the plugin accelerate's launcher builds from these keys
        ds = config.deepspeed_config
        plugin = DeepSpeedPlugin(zero_stage=ds["zero_stage"], zero3_init_flag=ds["zero3_init_flag"],
                                 gradient_accumulation_steps=ds["gradient_accumulation_steps"],
                                 offload_optimizer_device=ds["offload_optimizer_device"])
        assert plugin.zero_stage == 3


@pytest.mark.slow
@needs_deepspeed
def test_the_loop_under_zero3_trains_as_without_it(tmp_path, tiny_policy_dir, tiny_prompts_file):
    """The whole loop through `accelerate launch` with examples/accelerate/zero3.yaml, on one CPU
    process (accelerate runs DeepSpeed multi-process on GPUs only): ZeRO-3's placeholders, the
    filled config, the reference as a DeepSpeed engine, two micro-batches a step (one DeepSpeed step
    at the boundary), the held-out check and the gathered final/; with LoRA, the adapter trained on
    a partitioned base and merged from gathered factors. Each trains what the plain loop trains: the
    same per-step metrics and final weights, to float rounding. And the CLI's console stays free of
    DeepSpeed's accelerator warning. Under ``async_steps: 1`` too (batches one update stale, labelled
    on the annotation thread). (The variants share one launch and one plain process: each process
    start imports DeepSpeed, accelerate and transformers anew.)"""
    import json

    import torch
    import yaml
    from safetensors.torch import load_file

    launch = yaml.safe_load((WORKER.parents[1] / "examples" / "accelerate" / "zero3.yaml").read_text())
    launch |= {"num_processes": 1, "mixed_precision": "no"}
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(launch))
    cfg = {"algorithm": "dar", "model_name_or_path": str(tiny_policy_dir), "dataset": str(tiny_prompts_file),
           "eval_dataset": str(tiny_prompts_file), "eval_max_prompts": 2,
           "annotator": {"type": "function", "function": f"{WORKER.parent / 'tiny.py'}:length_reward"},
           "num_generations": 2, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2,
           "max_completion_length": 8, "max_steps": 2, "report": False, "save_strategy": "no"}
    variants = {"full": cfg,  # with LoRA the reference is the policy with its adapter off; final/ is the merged model
                "lora": cfg | {"use_peft": True, "lora_r": 4, "learning_rate": 1e-3},
                # pipelined: labels bought on the annotation thread while ZeRO-3's collectives stay on this one
                "async": cfg | {"async_steps": 1, "max_steps": 3}}
    commands = {"zero3": [], "plain": []}
    for name, values in variants.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(values))
        for launch_kind, runs in commands.items():
            runs += ["--", "train", "--config", str(tmp_path / f"{name}.yaml"), "--output_dir", str(tmp_path / launch_kind / name)]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"OMP_NUM_THREADS": "1"}
    launched = {"zero3": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "zero3.yaml"),
                          str(WORKER.parent / "zero3_train.py"), *commands["zero3"]],
                "plain": [sys.executable, str(WORKER.parent / "cli_commands.py"), *commands["plain"]]}  # the CLI's main
    # in a fresh process: the console a user sees
    if not torch.accelerator.is_available():  # the control: the same import outside the CLI
        launched["bare"] = [sys.executable, "-c", "import torch; from accelerate import Accelerator; "
                            "Accelerator(cpu=True).unwrap_model(torch.nn.Linear(1, 1))"]
    # single-threaded processes side by side (a core each), not one after the other
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in launched}
    procs = {name: subprocess.Popen(cmd, env=env, stdout=logs[name], stderr=subprocess.STDOUT) for name, cmd in launched.items()}
    try:
        for proc in procs.values():
            proc.wait(timeout=600)
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
            logs[name].close()
    console = {name: (tmp_path / f"{name}.log").read_text() for name in launched}
    for name in ("zero3", "plain"):
        assert procs[name].returncode == 0, console[name][-3000:]
    # accelerate imports DeepSpeed wherever it is installed, and on a machine without an accelerator
    # DeepSpeed says on stdout that it chose the CPU; the CLI tells it first (the plain runs: a fresh
    # process with the CLI's own setup). The same import outside the CLI does print it.
    assert "Setting accelerator to CPU" not in console["plain"]
    if "bare" in console:
        assert "Setting accelerator to CPU" in console["bare"]
    for name in variants:
        runs = {kind: [json.loads(line) for line in (tmp_path / kind / name / "metrics.jsonl").read_text().splitlines()]
                for kind in commands}
        for sharded, unsharded in zip(runs["zero3"], runs["plain"], strict=True):
            for key in ("loss", "reward", "kl", "grad_norm", "annotation_requests"):
                assert sharded[key] == pytest.approx(unsharded[key], rel=1e-5, abs=1e-6), (name, key)
            assert sharded.get("async/staleness") == unsharded.get("async/staleness"), name
        weights = [load_file(str(tmp_path / kind / name / "final" / "model.safetensors")) for kind in commands]
        assert weights[0].keys() == weights[1].keys()
        assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[1]) < 1e-5, name
        after = [json.loads((tmp_path / kind / name / "heldout_after.json").read_text()) for kind in commands]
        assert after[0]["completions"] == after[1]["completions"], name
        assert after[0]["kl"] == pytest.approx(after[1]["kl"], abs=1e-6), name
    assert [r["async/staleness"] for r in runs["zero3"]] == [0.0, 1.0, 1.0]  # the last variant's: async
