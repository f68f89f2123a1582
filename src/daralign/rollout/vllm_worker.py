"""Runs inside vLLM's worker (``worker_extension_cls``), in both ``vllm_mode``s: the one call that
loads the trainer's weights into the engine, reachable as ``collective_rpc("daralign_load_weights")``
in-process and as ``POST /collective_rpc`` on a ``daralign vllm-serve`` server.

Why not vLLM's ``reload_weights`` alone: on the CPU, vLLM packs every linear layer's weight for
its GEMM kernel once, after loading. A tied LM head (SmolLM2, Qwen2.5-0.5B: ``lm_head`` *is*
``embed_tokens``) is skipped by the loader, so a reload updates the embedding but leaves the
head's packed copy stale: measured here, the pushed model's log-probs were then 0.02–0.06 nats
off. Re-packing the head after the reload makes them agree to ~1e-5 again. On GPUs nothing is
packed and the re-pack does nothing.

Importing it also registers the ``daralign_gloo`` weight-transfer backend (``rollout/vllm_gloo.py``)
with vLLM, before a worker builds its transfer engine.

Kept free of daralign imports: vLLM imports this module in its own worker processes.
"""

from __future__ import annotations


def _register_gloo_transfer() -> None:
    """Register ``daralign_gloo`` (by module path: imported only by a server started with it). A vLLM
    whose registry changed says so in one line naming itself and the call, and the engine still
    starts: only a server asked for ``--weight_transfer gloo`` needs the backend (it then stops,
    with vLLM's own "Invalid weight transfer backend" after this line)."""
    symbol = "vllm.distributed.weight_transfer.factory.WeightTransferEngineFactory.register_engine"
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

        WeightTransferEngineFactory.register_engine("daralign_gloo", "daralign.rollout.vllm_gloo", "GlooWeightTransferEngine")
    except ValueError as e:
        if "already registered" not in str(e):  # registered already in this process: nothing to do
            _say_broken(symbol, e)
    except (ImportError, AttributeError, TypeError) as e:
        _say_broken(symbol, e)


def _say_broken(symbol: str, error: Exception) -> None:
    import sys

    import vllm

    version = getattr(vllm, "__version__", "of unknown version")  # a source build may have no package metadata
    # rollout/vllm_contract.py says the same for the trainer's side (this module imports no daralign)
    print(f"daralign: vLLM {version}: {symbol} is not what daralign calls ({type(error).__name__}: {error}); the daralign_gloo "
          "weight transfer is unavailable (daralign is tested with vllm>=0.32,<0.33)", file=sys.stderr, flush=True)


_register_gloo_transfer()


class DaralignWorkerExtension:
    """Methods mixed into vLLM's worker class."""

    def daralign_load_weights(self, weights_path: str | None = None, weights_iterator=None) -> None:
        """Load weights (a folder of safetensors, or (name, tensor) pairs in-process) and re-pack
        what vLLM's CPU backend derived from them."""
        self.reload_weights(weights_iterator=weights_iterator, weights_path=weights_path)
        refresh_tied_heads(self.model_runner.get_model())


def refresh_tied_heads(model) -> int:
    """Re-run weight post-processing for LM heads that share their weight with the embedding."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = {m.weight.data_ptr() for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    refreshed = 0
    for m in model.modules():
        if isinstance(m, ParallelLMHead) and m.weight.data_ptr() in embeddings:
            m.quant_method.process_weights_after_loading(m)
            refreshed += 1
    return refreshed
