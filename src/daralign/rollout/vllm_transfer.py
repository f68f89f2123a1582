"""How a weight push reaches a vLLM server (``vllm_mode: server``) without a file: vLLM's own
weight transfer, the routes of its RL API (``/init_weight_transfer_engine`` once, then per push
``/start_weight_update``, ``/update_weights`` beside the broadcast, ``/finish_weight_update``).

- ``nccl``: vLLM's ``NCCLTrainerWeightTransferEngine``: the trainer joins the server's workers in
  one NCCL group (a TCP rendezvous at this machine's address) and broadcasts the weights in packed
  buckets, GPU to GPU. Needs CUDA on both sides; it has not run on a GPU yet (docs/gpu.md).
- ``gloo``: the same handshake over gloo (``rollout/vllm_gloo.py``), for machines without CUDA; the
  tests run it against a real server.
- ``auto`` follows the server: the backend it was started with (``daralign vllm-serve
  --weight_transfer``), else the file (``rollout/vllm_server.py``).

Each tensor travels in the server's dtype, cast before it is sent (an fp32 policy sends a bf16
server half the bytes). Written against vLLM 0.32's ``WeightSource`` (``rollout/vllm_contract.py``).

Only the main process talks to the server. The tensors may be FSDP2 shards: they are gathered one
at a time as they are sent (``sharding.whole``); the other processes walk the same gathers.
"""

from __future__ import annotations

import socket

import httpx
import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient

from daralign.core.errors import ConfigError
from daralign.core.sharding import whole, whole_shape

SERVER_BACKENDS = {"nccl": "nccl", "daralign_gloo": "gloo"}  # vLLM's backend name → vllm_weight_transfer


class PushedWeights(WeightSource):
    """One push's (name, tensor) pairs: the metadata without gathering (a shard knows its whole shape),
    the tensors gathered one at a time as they are sent, each cast to ``dtype`` (the server's) first
    where one is given — what the metadata declares, so the server's buffers match the bytes sent."""

    def __init__(self, pairs: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> None:
        self.pairs, self.dtype = pairs, dtype

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, self.dtype or t.dtype, whole_shape(t)) for name, t in self.pairs]

    def __iter__(self):
        return ((name, whole(t).to(self.dtype or t.dtype)) for name, t in self.pairs)


def server_backend(http: httpx.Client) -> str | None:
    """The transfer the server was started with (``vllm_weight_transfer``'s spelling), or None."""
    r = http.get("/server_info", params={"config_format": "json"})
    if r.status_code != 200:
        return None
    config = (r.json().get("vllm_config") or {}).get("weight_transfer_config") or {}
    return SERVER_BACKENDS.get(config.get("backend"))


def choose(kind: str, http: httpx.Client) -> str:
    """``file``, ``nccl`` or ``gloo`` for this trainer and this server; a one-line refusal where they cannot meet."""
    served = server_backend(http)
    if kind == "auto":
        kind = served or "file"
        if kind == "nccl" and not torch.cuda.is_available():
            kind = "file"  # a CPU trainer beside a GPU server: the file still works
    if kind == "file":
        return kind
    if served != kind:
        raise ConfigError(f"vllm_weight_transfer {kind}: the vLLM server at {http.base_url} was started with "
                          f"{served or 'no weight transfer'}; start it with `daralign vllm-serve --weight_transfer {kind}`, "
                          "or set vllm_weight_transfer: file")
    if kind == "nccl" and not torch.cuda.is_available():
        raise ConfigError("vllm_weight_transfer nccl: this trainer has no CUDA device; use gloo or file")
    return kind


def _address_towards(url: httpx.URL) -> str:
    """This machine's address on the route to the server, where its workers can reach the rendezvous."""
    with socket.create_connection((url.host, url.port or 80), timeout=10) as s:
        return s.getsockname()[0]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class WeightTransfer:
    """The trainer's end of vLLM's weight transfer, opened once per run (main process only)."""

    def __init__(self, kind: str, http: httpx.Client, timeout: float, dtype: torch.dtype | None = None) -> None:
        self.url, self.dtype = str(http.base_url).rstrip("/"), dtype  # dtype: the server's, what pushes are cast to
        world = http.get("/get_world_size").raise_for_status().json()["world_size"]  # the server's workers, every engine
        host = _address_towards(http.base_url)
        self.client = HTTPVLLMWeightSyncClient(self.url, timeout=timeout)
        if kind == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

            engine, info = NCCLTrainerWeightTransferEngine, NCCLTrainerInitInfo
        else:
            from daralign.rollout.vllm_gloo import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine

            engine, info = GlooTrainerWeightTransferEngine, GlooTrainerInitInfo
        init = info(master_address=host, master_port=_free_port(host), world_size=1 + world, rank=0)
        self.engine = self._guarded("/init_weight_transfer_engine",
                                    lambda: engine.trainer_init(init, client=self.client, source=PushedWeights([])))

    def push(self, pairs) -> None:
        """Send one push's (name, tensor) pairs (``sharding.merged_weights``)."""
        self.engine.source = PushedWeights(list(pairs), self.dtype)
        self._guarded("/update_weights", self.engine.send_weights)

    def _guarded(self, route: str, call):
        import requests

        try:
            return call()
        except requests.HTTPError as e:  # vLLM's client: the server's answer, in one line
            raise ConfigError(f"vLLM server {self.url}: {route} answered {e.response.status_code}: {e.response.text[:300]}") from None

    def close(self) -> None:
        import requests

        self.engine.shutdown()
        try:  # the server's end too, so the next run can open its own
            self.client.shutdown_weight_transfer_engine()
        except requests.RequestException:
            pass
