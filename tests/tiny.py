"""Shared tiny-model builders for the foundation tests (no Hub, CPU, milliseconds).

- ``build_tokenizer``: a byte-level BPE trained here on a small corpus, wrapped as a
  ``PreTrainedTokenizerFast`` with eos / pad tokens and a chat template (ChatML for the policy; a
  different, bracket-style template for the reward model so tests can tell which one rendered).
- ``build_causal_lm`` / ``build_reward_model``: random 2-layer Llamas as offline-models.md says.
  ``eos_boost`` makes EOS likely (≈ a few tokens per answer) so EOS handling is exercised.
- ``save_policy`` / ``save_reward_model``: ``save_pretrained`` folders that
  ``daralign.core.models.load_causal_lm(folder)`` / the ``reward_model`` annotator load directly.
- Reward functions (``module:function`` style, TRL convention) used by the training tests through
  ``f"{TINY_PY}:<name>"``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

TINY_PY = str(Path(__file__).resolve())

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The reward model's own template: no ChatML markers at all.
RM_TEMPLATE = ("{% for m in messages %}[[{{ m['role'] | upper }}]] {{ m['content'] }} [[END]]\n{% endfor %}"
               "{% if add_generation_prompt %}[[ASSISTANT]] {% endif %}")

CORPUS = [
    "Write a poem about the sea.", "What is the capital of France? Paris is the capital.",
    "Explain gravity in simple words, please.", "Tell me about the ocean and its waves.",
    "Describe a walk in the park on a sunny day.", "What is a good breakfast? Eggs and toast.",
    "I am happy to help you with that!", "Great question, here is a short answer.",
]


def build_tokenizer(template: str = CHATML, specials=("<|im_start|>", "<|im_end|>", "<pad>"),
                    eos: str = "<|im_end|>", pad: str | None = "<pad>", vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 10, trainer)
    kwargs = {"eos_token": eos, "bos_token": specials[0]}
    if pad is not None:
        kwargs["pad_token"] = pad
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **kwargs)
    tok.chat_template = template
    return tok


def _llama_config(tok, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, **extra)


def build_causal_lm(tok, seed: int = 0, eos_boost: float = 0.0):
    """A random 2-layer Llama. ``eos_boost`` > 0 adds a constant feature to every embedding and
    aligns the EOS output row with it, so EOS gets a higher logit at every position."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tok))
    if eos_boost:
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 1.0  # residual stream carries a constant +dim 0
            model.lm_head.weight[tok.eos_token_id, 0] = eos_boost
    return model


def save_policy(folder: str | Path, tok=None, seed: int = 0, eos_boost: float = 0.6) -> Path:
    folder = Path(folder)
    tok = tok or build_tokenizer()
    model = build_causal_lm(tok, seed=seed, eos_boost=eos_boost)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def save_vllm_policy(folder: str | Path, seed: int = 0) -> Path:
    """The tiny policy made wide enough for vLLM's CPU attention (head_dim 32, its smallest)."""
    import torch
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    tok = build_tokenizer()
    config = _llama_config(tok)
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def build_reward_model(tok, seed: int = 1):
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_llama_config(tok, num_labels=1))
    with torch.no_grad():  # spread the scores out (the random head gives ≈0 for everything)
        model.score.weight.mul_(50.0)
    return model


def save_reward_model(folder: str | Path, seed: int = 1) -> Path:
    folder = Path(folder)
    tok = build_tokenizer(template=RM_TEMPLATE, specials=("<s>", "</s>", "<rm_pad>"), eos="</s>", pad="<rm_pad>",
                          vocab_size=300)
    model = build_reward_model(tok, seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path: str | Path, rows) -> Path:
    import json

    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPTS = [
    "Tell me about the ocean.", "Describe a walk in the park.", "What is a good breakfast?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a poem about the sea."}],
    "Explain gravity in simple words.", "What is the capital of France?",
]


# ---------------------------------------------------------------- reward functions (TRL convention)
def _delay():
    d = float(os.environ.get("DARALIGN_TEST_REWARD_DELAY", "0") or 0)
    if d:
        time.sleep(d)


def length_reward(prompts, completions, **kwargs):
    """Deterministic, varied: more characters and more 'e's score higher."""
    _delay()
    return [0.05 * len(c) + c.count("e") for c in completions]


def secret_reward(prompts, completions, api_key=None, **kwargs):
    assert api_key == "sk-test-secret-value"
    return [float(len(c)) for c in completions]


def column_reward(prompts, completions, target=None, bonus=0.0, **kwargs):
    """Uses the extra dataset column ``target`` (a list aligned with completions) and a kwarg."""
    return [float(t) + bonus for t in target]


def nan_reward(prompts, completions, **kwargs):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def inf_reward(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1) + [math.inf]


def short_reward(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def none_first_reward(prompts, completions, **kwargs):
    return [None] + [float(i) for i in range(1, len(completions))]


def constant_reward(prompts, completions, **kwargs):
    """Every response the same score: no signal to learn from."""
    return [0.5] * len(completions)


def sometimes_invalid_reward(prompts, completions, **kwargs):
    """length_reward, but the second response of each call is unlabelled (None)."""
    return [None if i == 1 else 0.05 * len(c) + c.count("e") for i, c in enumerate(completions)]


def run_config(tmp: str | Path, policy: Path, prompts: Path, **over) -> Path:
    """A training YAML on the tiny policy (2 prompts × K=2, function reward), with overrides; a new
    file per call in ``tmp``."""
    import yaml

    cfg = {"model_name_or_path": str(policy), "dataset": str(prompts), "num_generations": 2,
           "per_device_train_batch_size": 2, "max_completion_length": 4, "max_steps": 2, "learning_rate": 1e-3,
           "seed": 7, "report": False, "annotator": {"type": "function", "function": f"{TINY_PY}:length_reward"}, **over}
    path = Path(tmp) / f"cfg{len(list(Path(tmp).glob('cfg*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
