"""Scale-out on torch.distributed, launched by ``torchrun`` (docs/design.md §8).

Two ways of spreading work over K processes (ranks), both on ``torch.distributed`` collectives
(NCCL on GPUs, gloo on CPUs), with no protocol of perk's own:

* **meta-batch sharding** (``python -m perk.train`` under torchrun): every rank computes the
  global batch of a step (a pure function of the step, :func:`perk.train.batch_indices`), takes
  its contiguous share (:func:`shard`), computes the loss and gradients of its share, and
  :func:`all_reduce_mean` turns them into those of the whole batch with ONE all-reduce of one flat
  buffer. Every rank then holds the same gradient, so the same Adam step keeps the meta-parameters
  (and the optimizer state) identical on all ranks without ever broadcasting them.
* **context sharding** (``PerkModel.encode(..., process_group=...)``, ``python -m perk.encode
  --shard_context``): one context's segment rows are split over the ranks (:func:`shard_rows`);
  each inner step all-reduces the inner gradient and the inner losses (:func:`all_reduce_sum_`),
  so every rank takes the step one process would, holding 1/K of the activations.

Without torchrun (or with one process) :func:`from_torchrun` returns a single-process :class:`Launch`
and no collective is ever called: the single-process code path is unchanged.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from perk.segments import TokenBatch

# Metrics that add up over ranks (a throughput); every other one is a weighted mean.
SUMMED_METRICS = ("tok_s",)


@dataclass(frozen=True)
class Launch:
    """How this process was started: its rank among ``world_size`` processes and its device
    (``cuda:LOCAL_RANK`` under torchrun on GPUs)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # the process group's backend; None without one

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, shows progress bars and writes files."""
        return self.rank == 0


SINGLE_PROCESS = Launch()


def _environment_int(name: str, default: str | None = None) -> int:
    """A torchrun environment variable as a non-negative int; ValueError naming it otherwise (set
    by hand without the others, or malformed)."""
    text = os.environ.get(name, default)
    if text is None:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {name} is not: start the processes with "
                         "torchrun, which sets WORLD_SIZE, RANK and LOCAL_RANK together (or unset WORLD_SIZE)")
    if not text.strip().isdigit():
        raise ValueError(f"{name}={text!r} is not a process count or index")
    return int(text)


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` of the torchrun environment (1 outside torchrun)."""
    return _environment_int("WORLD_SIZE", "1")


def from_torchrun(device: str) -> Launch:
    """Join the torchrun process group when there is one (``WORLD_SIZE`` > 1): NCCL on
    ``cuda:LOCAL_RANK`` when ``device`` is ``cuda``, gloo on CPU. Outside torchrun, or with one
    process, nothing is initialised and the launch is single-process on ``device``."""
    world_size = torchrun_world_size()
    if world_size <= 1:
        return Launch(device=device)
    rank, local_rank = _environment_int("RANK"), _environment_int("LOCAL_RANK", "0")
    if rank >= world_size:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={world_size}")
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)  # env:// rendezvous: MASTER_ADDR/PORT, RANK, WORLD_SIZE from torchrun
    return Launch(rank, world_size, local_rank, device, backend)


def close(launch: Launch) -> None:
    """Leave the process group (a no-op for a single-process launch)."""
    if launch.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(launch: Launch) -> None:
    if launch.distributed:
        dist.barrier()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous share of ``n`` items: shares differ by at most
    one item, earlier ranks take the smaller ones, and the shares in rank order are the items in order."""
    return n * rank // world_size, n * (rank + 1) // world_size


def shard(items: Sequence, launch: Launch) -> list:
    """This rank's contiguous share of ``items`` (all of them for a single-process launch)."""
    start, stop = shard_bounds(len(items), launch.rank, launch.world_size)
    return list(items[start:stop])


def shard_rows(batch: TokenBatch, rank: int, world_size: int) -> TokenBatch:
    """Rank ``rank``'s contiguous share of ``batch``'s rows. The rows keep their loss weights,
    normalised over the whole batch, so the ranks' losses and gradients sum to the whole ones."""
    start, stop = shard_bounds(batch.input_ids.shape[0], rank, world_size)
    return batch.select(slice(start, stop))


def group_size(process_group) -> int:
    """Processes of ``process_group`` (a ProcessGroup, ``dist.group.WORLD``), 1 for None."""
    return 1 if process_group is None else dist.get_world_size(process_group)


def all_reduce_sum_(tensors: Sequence[torch.Tensor], process_group) -> list[torch.Tensor]:
    """Σ over the ranks of ``process_group`` of each tensor (same shapes on every rank), with one
    all-reduce of one flat buffer (in the first tensor's dtype); returns the sums."""
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    dist.all_reduce(flat, group=process_group)
    sums, start = [], 0
    for t in tensors:
        sums.append(flat[start : start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return sums


def all_reduce_mean(loss: float, grads: dict[str, torch.Tensor], info: dict[str, float], weight: float,
                    launch: Launch) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    """The loss, gradients and metrics of the whole batch from each rank's own (ONE all-reduce).

    Each rank's loss and gradients are the mean over its share; ``weight`` is that share's size
    in the unit of the mean (problems for PERK's per-problem mean, answer tokens for FT-ICR's
    token mean). The sum over ranks of ``weight · mean`` divided by the sum of the weights is the
    mean over the whole batch: what one process computes on the global batch (up to float
    rounding order). Metrics are weighted means too, except :data:`SUMMED_METRICS`, which add up.
    """
    names, keys = list(grads), list(info)
    reference = grads[names[0]]
    # One buffer: [w·grad..., w·loss, w·metric or metric..., w] in the gradients' dtype.
    scalars = [weight * loss] + [info[k] if k in SUMMED_METRICS else weight * info[k] for k in keys] + [weight]
    buffer = torch.cat([grads[n].detach().reshape(-1) * weight for n in names]
                       + [torch.tensor(scalars, dtype=reference.dtype, device=reference.device)])
    dist.all_reduce(buffer)
    total = buffer[-1]
    reduced, start = {}, 0
    for name in names:
        size = grads[name].numel()
        reduced[name] = (buffer[start : start + size] / total).view(grads[name].shape)
        start += size
    values = buffer[start:-1].tolist()
    total = float(total)
    loss = values[0] / total
    info = {k: v if k in SUMMED_METRICS else v / total for k, v in zip(keys, values[1:])}
    return loss, reduced, info


def gather_lists(items: list, launch: Launch) -> list[list]:
    """Every rank's list of picklable ``items``, in rank order, on every rank."""
    if not launch.distributed:
        return [items]
    gathered: list = [None] * launch.world_size
    dist.all_gather_object(gathered, items)
    return gathered


def check_same_everywhere(what: str, text: str, launch: Launch) -> None:
    """ValueError on every rank unless ``text`` (``what``, e.g. a resolved config) is the same on all
    of them: one all-gather of its SHA-256. Processes started with different options would otherwise
    fail in a collective of mismatched shapes or, worse, silently train with different seeds or rates."""
    if not launch.distributed:
        return
    digest = hashlib.sha256(text.encode()).hexdigest()
    digests = gather_lists([digest], launch)
    differing = [rank for rank, (other,) in enumerate(digests) if other != digests[0][0]]
    if differing:
        raise ValueError(f"{what} differs between the processes (rank{'s' if len(differing) > 1 else ''} "
                         f"{', '.join(map(str, differing))} vs rank 0): give every process the same options")


def from_rank0(value, launch: Launch):
    """Rank 0's ``value`` (picklable) on every rank: for choices that must not differ between
    processes but are made by measuring (e.g. the CPU base dtype of ``base_dtype=auto``)."""
    if not launch.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
