"""The shard plan: ordered item indices cut into fixed-size shards, and which shards this process takes."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mv2batch.errors import ConfigError

DEFAULT_SHARD_SIZE = {"classify": 10_000, "segment": 1_000, "embed": 10_000}


@dataclass(frozen=True)
class ShardPlan:
    """n_items split into consecutive shards of shard_size (the last one shorter)."""

    n_items: int
    shard_size: int

    @property
    def n_shards(self) -> int:
        return -(-self.n_items // self.shard_size)

    def shard(self, number: int) -> range:
        """The item indices of one shard."""
        start = number * self.shard_size
        return range(start, min(start + self.shard_size, self.n_items))

    def describe(self) -> dict:
        return {"n_items": self.n_items, "shard_size": self.shard_size, "n_shards": self.n_shards}


@dataclass(frozen=True)
class Rank:
    """This process's place among the processes that share a run (torchrun or Slurm)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank

    @property
    def is_first(self) -> bool:
        return self.rank == 0


ENV_SCHEMES = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))


def rank_from_env(environ: dict | None = None) -> Rank:
    """torchrun's variables first, then Slurm's; a single process when neither is set."""
    env = os.environ if environ is None else environ
    for rank_var, world_var, local_var in ENV_SCHEMES:
        if rank_var in env and world_var in env:
            try:
                rank, world = int(env[rank_var]), int(env[world_var])
                local = int(env[local_var]) if local_var in env else None
            except ValueError:
                raise ConfigError(f"{rank_var}/{world_var} must be integers") from None
            if not 0 <= rank < world:
                raise ConfigError(f"{rank_var}={rank} is outside 0..{world - 1}")
            return Rank(rank, world, local)
    return Rank()


class Group:
    """Barriers between the processes of one run, where torchrun gives a rendezvous (gloo, CPU only).

    Under Slurm alone there is none: processes then coordinate through the files in OUT only.
    """

    def __init__(self, rank: Rank, environ: dict | None = None):
        env = os.environ if environ is None else environ
        self.active = rank.world_size > 1 and "MASTER_ADDR" in env and "MASTER_PORT" in env
        self.started_here = False
        if self.active:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", rank=rank.rank, world_size=rank.world_size)
                self.started_here = True

    def barrier(self) -> None:
        """Wait for every process of the run (no-op without a rendezvous)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.started_here:
            import torch.distributed as dist

            dist.destroy_process_group()
