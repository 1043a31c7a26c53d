"""Process-group setup and model wrapping for `torchrun` (DDP, FSDP2); no-ops in one process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous for multi-node); we only read
them. gloo on CPU, nccl on GPU. Everything here degrades to the single-process case so the stage
has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU if CUDA is available, else CPU."""
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {pref} asked for CUDA, but torch sees no GPU")
    if pref.startswith("cuda:"):
        return torch.device(pref)
    return torch.device("cuda", local_rank)


def init_distributed(device_pref: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join the torchrun process group if launched by torchrun, else return the 1-process env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def local_share() -> tuple[int, int]:
    """(this process's index among the processes of its node, their number), from torchrun's
    LOCAL_RANK / LOCAL_WORLD_SIZE: how per-node work (checksumming a cache) is split."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over ranks (`t` itself in one process), on `t`'s device.

    nccl reduces CUDA tensors only, so a CPU tensor (a token count) takes a round trip.
    """
    if not dist.is_initialized():
        return t
    x = t.cuda() if dist.get_backend() == "nccl" and t.device.type != "cuda" else t.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a 1-list in one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    """DDP over the whole trainable unit (student + projectors), so projector grads sync too."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    # broadcast_buffers=False: our modules have no running statistics to keep in step.
    return DDP(module, device_ids=ids, broadcast_buffers=False)


def wrap_fsdp2(module: nn.Module, student: nn.Module, env: DistEnv,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 (`fully_shard`): shard each transformer block of the student, then the root.

    Blocks are found through HF's `_no_split_modules` (the class names it never splits across
    devices, e.g. `GPT2Block`, `LlamaDecoderLayer`), so no per-architecture list lives here.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    block_names = set(getattr(_hf_model(student), "_no_split_modules", None) or [])
    blocks = [m for m in student.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise RuntimeError(f"--fsdp: found no transformer blocks in {type(student).__name__} "
                           f"(looked for {sorted(block_names) or 'HF _no_split_modules'})")
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 module back to its sharded parameters.

    A forward without backward (validation) leaves the root's parameters un-sharded; state-dict
    calls and the optimizer expect the sharded ones. No-op without FSDP2.
    """
    for m in module.modules():
        if callable(getattr(m, "reshard", None)) and type(m).__name__.startswith("FSDP"):
            m.reshard()


def _hf_model(student: nn.Module) -> nn.Module:
    """The HF PreTrainedModel under a peft wrapper, if any."""
    base = getattr(student, "get_base_model", None)
    return base() if callable(base) else student


def unwrap(module: nn.Module) -> nn.Module:
    """The module under DDP (FSDP2 modifies in place, so nothing to strip)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module
