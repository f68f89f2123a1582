"""The loop's vLLM side (``use_vllm``): starting the engine (colocated, or a ``daralign vllm-serve``
server), sampling from it, pushing weights after each update, and π_t — a recorded trainer forward,
or, for DAR and GRPO with one update per batch, the update's own forward (``objectives/base.py``).
A part of ``OnlineTrainer``, kept apart so the loop file stays about the loop."""

from __future__ import annotations

import time

import torch

from daralign.errors import ConfigError
from daralign.rollout.vllm import attach_trainer_logps


class VLLMRollouts:
    """Needs from the trainer: ``cfg``, ``tokenizer``, ``policy``, ``unwrapped``, ``accelerator``, ``vllm``,
    ``pi_t_from_update``, ``K``, ``objective`` and ``_forward_token_logps``."""

    def _start_vllm(self):
        from daralign import bundled
        from daralign.rollout.vllm import VLLMColocate

        cfg = self.cfg
        if cfg.vllm_mode == "server":
            from daralign.rollout.vllm_server import VLLMServer

            server = VLLMServer(cfg.vllm_server_url, self.tokenizer, seed=cfg.seed, sync_dir=cfg.vllm_sync_dir,
                                is_main=self.accelerator.is_main_process)
            # the server holds whatever it was last given (another run's weights, maybe): start it at this policy
            server.sync_weights(self.accelerator.unwrap_model(self.policy))
            self.accelerator.wait_for_everyone()
            return server
        if str(cfg.model_name_or_path).endswith(".gguf"):
            raise ConfigError("use_vllm: give the policy as a model folder or Hub id (vLLM does not train-sync GGUF files)")
        path = bundled.resolve(cfg.model_name_or_path) if bundled.is_bundled(cfg.model_name_or_path) else cfg.model_name_or_path
        return VLLMColocate(path, self.tokenizer, dtype=cfg.dtype, max_model_len=cfg.max_prompt_length + cfg.max_completion_length + 16,
                            seed=cfg.seed, enforce_eager=cfg.vllm_enforce_eager,
                            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)

    def _sync_vllm(self) -> None:
        self.vllm.sync_weights(self.unwrapped)
        self.accelerator.wait_for_everyone()  # a server is pushed to by the main process: the others wait for it

    def _vllm_rollout(self, rows: list[dict], step: int):
        """Sample from the engine; π_t is the trainer's own log-prob of the sampled tokens (vLLM's is
        checked against it): a recorded forward now, or the update's own (``pi_t_from_update``)."""
        rollout, vllm_logps = self.vllm.sample(
            self.unwrapped, rows, step=step, num_generations=self.K, max_completion_length=self.cfg.max_completion_length,
            temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k,
            max_prompt_length=self.cfg.max_prompt_length)
        if self.pi_t_from_update:
            rollout.behaviour_token_logps, self._vllm_logps = None, vllm_logps  # filled after the update
        else:
            t = time.perf_counter()
            self._rollout_metrics = attach_trainer_logps(rollout, self._forward_token_logps(self.unwrapped, rollout), vllm_logps)
            self._rollout_metrics["timing/behaviour_forward"] = time.perf_counter() - t
        return rollout

    def _behaviour_from_update(self, rollout, recorded, feedback, ref) -> dict:
        """Fill π_t with the update forward's log-probs (one forward now if no update ran), check vLLM's
        against them, and recompute the objective's metrics with it (``prepare`` is cheap: no forward)."""
        if recorded is None:
            t = time.perf_counter()
            recorded = self._forward_token_logps(self.unwrapped, rollout)
            self._rollout_metrics = {"timing/behaviour_forward": time.perf_counter() - t}
        else:
            self._rollout_metrics = {}
        self._rollout_metrics |= attach_trainer_logps(rollout, recorded.float(), self._vllm_logps)
        with torch.no_grad():
            return self.objective.prepare(rollout, feedback, ref, self.unwrapped)[1]
