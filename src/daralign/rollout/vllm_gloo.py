"""vLLM's NCCL weight transfer, carried by gloo over TCP instead: the same routes, handshake and
per-tensor broadcast (``/init_weight_transfer_engine``, ``/start_weight_update``,
``/update_weights`` beside the broadcast, ``/finish_weight_update``), for a trainer and a server
without CUDA. It is what the tests run on a CPU, so the handshake the NCCL path depends on is
exercised for real; on GPUs use NCCL (``vllm_weight_transfer: nccl``), which is vLLM's own.

Both halves live here: the server's (registered with vLLM as ``daralign_gloo`` when its workers
import ``rollout/vllm_worker.py``) and the trainer's. Kept free of daralign imports: vLLM's worker
processes import this module.
"""

from __future__ import annotations

import datetime
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo

BACKEND = "daralign_gloo"


class GlooGroup:
    """A two-sided gloo group outside torch's default one; rank 0 (the trainer) hosts the store."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float = 300.0) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        self.group = dist.ProcessGroupGloo(dist.PrefixStore("daralign-weights", self.store), rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """From rank 0 into ``tensor`` on every other rank (CPU, contiguous)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        self.group = self.store = None


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """The server's half: vLLM's dense NCCL engine (its layerwise reload around the update, its init
    and update infos) receiving each tensor from a gloo broadcast."""

    def init_transfer_engine(self, init_info: NCCLWeightTransferInitInfo) -> None:
        p = self.parallel_config  # this worker's rank among every engine's workers, after the trainer's
        rank = p.data_parallel_index * p.world_size + p.rank + init_info.rank_offset
        self.model_update_group = GlooGroup(init_info.master_address, init_info.master_port, rank, init_info.world_size)

    def finish_weight_update(self) -> None:
        """vLLM's reload finish, then the CPU's re-pack of a tied LM head (``vllm_worker.refresh_tied_heads``):
        without it the head keeps the old weights (measured: 0.018 nats off after a push)."""
        from daralign.rollout.vllm_worker import refresh_tied_heads

        super().finish_weight_update()
        refresh_tied_heads(self.model)

    def receive_weights(self, update_info) -> None:
        for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
            weight = torch.empty(shape, dtype=getattr(torch, dtype_name))
            self.model_update_group.broadcast(weight)
            self.model.load_weights([(name, weight)])


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int  # the trainer's sender + every server worker


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """The trainer's half, the order of vLLM's ``NCCLTrainerWeightTransferEngine``: the server's
    blocking calls run on a side thread while this side joins the same collective."""

    init_info_cls = GlooTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None) -> "GlooTrainerWeightTransferEngine":
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        engine.group = None
        if engine.is_sender:
            worker = NCCLWeightTransferInitInfo(master_address=init_info.master_address, master_port=init_info.master_port,
                                                rank_offset=1, world_size=init_info.world_size)
            with ThreadPoolExecutor(max_workers=1) as exe:
                joined = exe.submit(client.init_weight_transfer_engine, {k: v for k, v in asdict(worker).items() if v is not None})
                engine.group = GlooGroup(init_info.master_address, init_info.master_port, 0, init_info.world_size)
                joined.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:  # only takes part in the trainer's own gathers
            for _ in self.source:
                pass
            return
        info = {"names": [m.name for m in meta], "dtype_names": [str(m.dtype).split(".")[-1] for m in meta],
                "shapes": [list(m.shape) for m in meta]}
        self.client.start_weight_update()
        with ThreadPoolExecutor(max_workers=1) as exe:
            received = exe.submit(self.client.update_weights, info)
            for (name, tensor), m in zip(self.source, meta, strict=True):
                if name != m.name or tuple(tensor.shape) != m.shape:  # a mismatch would hang the receiver
                    raise ValueError(f"weight source: {name} {tuple(tensor.shape)} does not match its metadata {m}")
                self.group.broadcast(tensor.detach().to("cpu").contiguous())
            received.result()
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None
