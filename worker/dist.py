"""Process-group plumbing: who am I, share the plan, claim shards.

Inference needs no gradient sync, so there is no DDP wrapper. The process group
carries only control traffic: the broadcast of the plan's index (a few hundred bytes per
piece of 64k images, never the images: each rank reads its own shards' rows from OUTPUT),
barriers, and (for dynamic assignment) an atomic shard counter in torchrun's rendezvous store.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def _next_shard_key() -> str:
    # torchrun keeps its store across worker restarts; a fresh counter per attempt
    # lets restarted ranks re-claim the shards a crashed attempt never committed.
    return f"batch_inference/next_shard/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


@dataclass
class Topology:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    control_group: Any = None  # a gloo group: control traffic stays on CPU even when compute uses NCCL

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control_group)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object, on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def claim_shards(self, n_shards: int) -> Iterator[int]:
        """Dynamic assignment: each call to the shared counter hands out the next shard exactly once."""
        if not self.distributed:
            yield from range(n_shards)
            return
        store = dist.distributed_c10d._get_default_store()
        key = _next_shard_key()
        while True:
            index = store.add(key, 1) - 1
            if index >= n_shards:
                return
            yield index


def init(device: str) -> Topology:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU); a lone process needs none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world_size == 1:
        return Topology(0, 1, 0, 1)
    if device == "cuda" and local_world <= torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
        dist.init_process_group(
            "nccl", timeout=datetime.timedelta(hours=2), device_id=torch.device("cuda", local_rank)
        )
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
    elif device == "cuda":
        # More ranks than GPUs (several ranks share a GPU, one GIL each): NCCL refuses two
        # ranks on one device, and the only traffic is control anyway, so gloo carries it.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
        control = dist.group.WORLD
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
        control = dist.group.WORLD
    log.info(
        "rank %d/%d (local %d/%d) joined the %s process group",
        rank,
        world_size,
        local_rank,
        local_world,
        dist.get_backend(),
    )
    return Topology(rank, world_size, local_rank, local_world, control)


def shutdown(topo: Topology) -> None:
    if topo.distributed and dist.is_initialized():
        dist.destroy_process_group()
