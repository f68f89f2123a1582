"""Side computations (held-out sampling, seeded judge retries) must not move the training RNG
streams, or exact resume and the prompt/sample order of a run would depend on when they ran."""

from __future__ import annotations

import torch


def fork_rng():
    """``torch.random.fork_rng`` over the CPU *and every visible CUDA device*: ``torch.manual_seed``
    inside reseeds all of them, so forking only the CPU would leave the GPU sampler reset."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)
