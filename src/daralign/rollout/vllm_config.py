"""The two vLLM engines' own settings (``vllm_colocate.py``, ``vllm_server.py`` share them): the
``use_vllm`` / ``vllm_*`` keys of YAML and flags, spelt as TRL spells them. Imports no vllm."""

from __future__ import annotations

from dataclasses import dataclass, field

from daralign.core.errors import ConfigError


@dataclass
class VLLMConfig:
    """``use_vllm`` chooses a vLLM engine when ``rollout_engine`` is ``auto``; ``vllm_mode`` which one."""

    use_vllm: bool = field(default=False, metadata={"help": "sample with vLLM instead of transformers generate (weights pushed after every step; docs/performance.md)"})
    vllm_mode: str = field(default="colocate", metadata={"help": "colocate: the engine in the training process (TRL's naming) | server: a `daralign vllm-serve` process at vllm_server_url"})
    vllm_server_url: str = field(default="http://127.0.0.1:8000", metadata={"help": "vllm_mode server: where `daralign vllm-serve` listens"})
    vllm_sync_dir: str | None = field(default=None, metadata={"help": "vllm_mode server: a folder the server can read, for the weights pushed after each step (default /dev/shm: one host; a shared filesystem across nodes)"})
    vllm_weight_transfer: str = field(default="auto", metadata={"help": "vllm_mode server: how pushed weights reach the server: nccl (vLLM's NCCL transfer, GPU to GPU, no file) | gloo (the same without CUDA) | file (safetensors through vllm_sync_dir) | auto (what the server was started with: `daralign vllm-serve --weight_transfer`, else file)"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU memory share of a colocated vLLM engine (CPU: VLLM_CPU_KVCACHE_SPACE sets its KV cache, in GiB)"})
    vllm_enforce_eager: bool | None = field(default=None, metadata={"help": "no graph capture or compilation; default: eager on CPU (compiling took minutes there), CUDA graphs on CUDA"})
    vllm_dtype: str = field(default="auto", metadata={"help": "the colocated engine's weight dtype: auto = bfloat16 on CUDA, else the policy's dtype (pushed weights are cast to it)"})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "colocate on CUDA: GPUs per engine; with N training processes, N / this engines, each rank in a group sampling the group's prompts (TRL's vllm_tensor_parallel_size)"})
    vllm_max_num_batched_tokens: int | None = field(default=4096, metadata={"help": "the colocated engine's cap on tokens per scheduler step (TRL's 4096: vLLM's own default on an H100, 16384, makes its memory profiler set aside activation memory the training step needs; longer prompts are prefilled in chunks); unset: vLLM's default"})
    vllm_max_num_seqs: int | None = field(default=256, metadata={"help": "the colocated engine's cap on sequences in flight (vLLM's default on an H100 is 1024, which sizes its sampler's memory and CUDA graphs for batches a training step seldom has; more sequences wait their turn); unset: vLLM's default"})
    vllm_per_request_seeds: bool | None = field(default=None, metadata={"help": "seed each prompt's K samples from (seed, step, prompt), so a resumed run samples what the straight run would have; default: on a CPU, off on CUDA, where every seeded sequence costs vLLM's sampler its own noise kernel per token (vllm-project/vllm#21563) and the engine's seed keeps the run reproducible"})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "colocate on CUDA: the engine frees its KV cache and weights through the update and wakes to the freshly pushed weights (never reloaded from disk)"})
    vllm_lora_sync: str = field(default="merged", metadata={"help": "use_peft, colocate: merged = each LoRA layer's weight merged into a fresh tensor for each push, one layer at a time (the base weights are never written) | adapter = only the adapter's files pushed, the engine applies it as a vLLM LoRA (no merge; vLLM decodes adapters ~1.3x slower)"})

    def validate(self, train) -> None:
        """Checked with the rest of the run's settings (``TrainConfig.validate``), whichever engine samples."""
        if self.vllm_mode not in ("colocate", "server"):
            raise ConfigError(f"vllm_mode: {self.vllm_mode!r} is not one of colocate, server")
        if self.vllm_weight_transfer not in ("auto", "nccl", "gloo", "file"):
            raise ConfigError(f"vllm_weight_transfer: {self.vllm_weight_transfer!r} is not one of auto, nccl, gloo, file")
        if self.vllm_lora_sync not in ("merged", "adapter"):
            raise ConfigError(f"vllm_lora_sync: {self.vllm_lora_sync!r} is not one of merged, adapter")
        if self.use_vllm and self.vllm_lora_sync == "adapter" and (not train.use_peft or self.vllm_mode != "colocate"
                                                                    or self.vllm_enable_sleep_mode or self.vllm_tensor_parallel_size > 1):
            raise ConfigError("vllm_lora_sync adapter: for a LoRA policy (use_peft) in vllm_mode colocate, without sleep mode "
                              "(level-2 sleep drops the base weights the adapter rides on) or tensor parallelism; use merged")
        if self.vllm_tensor_parallel_size < 1 or (self.vllm_max_num_batched_tokens or 1) < 1 or (self.vllm_max_num_seqs or 1) < 1:
            raise ConfigError("vllm_tensor_parallel_size, vllm_max_num_batched_tokens and vllm_max_num_seqs must be ≥ 1")
        if self.vllm_max_num_batched_tokens and self.vllm_max_num_seqs and self.vllm_max_num_batched_tokens < self.vllm_max_num_seqs:
            raise ConfigError(f"vllm_max_num_batched_tokens ({self.vllm_max_num_batched_tokens}) must be ≥ vllm_max_num_seqs "
                              f"({self.vllm_max_num_seqs}): vLLM schedules at least one token per sequence in a step")
        if self.vllm_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"vllm_dtype: {self.vllm_dtype!r} is not one of auto, float32, bfloat16, float16")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1] (got {self.vllm_gpu_memory_utilization})")
