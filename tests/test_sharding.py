"""FSDP2 on two CPU processes (torchrun + gloo, torch's own ``fully_shard``): whole weights for the
push and ``final/`` gathered one tensor at a time, and HF generation in lockstep. accelerate runs
FSDP on GPUs only (docs/gpu.md), so the loop's own FSDP2 launch is not run here; its refusals are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import FullyShardedDataParallelPlugin

from daralign.core.errors import ConfigError
from daralign.core.sharding import check_launch, is_sharded, whole_state_dict

WORKER = Path(__file__).resolve().parent / "sharding_worker.py"


@pytest.mark.slow
def test_two_process_fsdp2_gathers_whole_weights_and_generates_in_lockstep(tmp_path, tiny_policy_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER),
                           str(tiny_policy_dir), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: sharded weights, lockstep generation and final/ ok" in proc.stdout
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_an_unsharded_model_is_its_own_whole(tiny_policy):
    model, _ = tiny_policy
    assert not is_sharded(model)
    state = whole_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    assert whole_state_dict(model, keep=False) is None


def _accelerator(fsdp=None, deepspeed=None):
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed))


def test_launches_not_built_are_refused_in_one_line():
    fsdp = FullyShardedDataParallelPlugin(fsdp_version=2)
    check_launch(_accelerator(), use_peft=True, has_eval=True)  # DDP / one process: everything goes
    check_launch(_accelerator(fsdp), use_peft=False, has_eval=False)
    with pytest.raises(ConfigError, match="FSDP with LoRA"):
        check_launch(_accelerator(fsdp), use_peft=True, has_eval=False)
    with pytest.raises(ConfigError, match="FSDP with an eval_dataset"):
        check_launch(_accelerator(fsdp), use_peft=False, has_eval=True)
    with pytest.raises(ConfigError, match="DeepSpeed is not supported yet"):
        check_launch(_accelerator(deepspeed=SimpleNamespace(zero_stage=3)), use_peft=False, has_eval=False)


@pytest.mark.parametrize("name, kind", [("fsdp2.yaml", "FSDP"), ("ddp.yaml", "MULTI_GPU")])
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
