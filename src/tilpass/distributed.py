"""Data-parallel (DDP) and sharded (FSDP2) training on PyTorch's own ``torch.distributed``.

A run started by ``torchrun`` (or ``tilpass train --nproc N``) has one process per device;
:func:`init_world` reads the launcher's environment, picks the backend (NCCL on GPUs, gloo
on CPU) and joins the process group with a timeout, so a rank that dies ends the others' wait
instead of hanging them. :class:`DataParallel` is what the training loop asks of it:

- each rank takes its own contiguous slice of every global micro-batch (the global data order
  stays a pure function of ``(seed, epoch)``), so the ranks' slices together are exactly the
  micro-batch a single process would train on; with packing, its slice of the step's
  examples, packed;
- the loss is normalised by the loss tokens of the whole step across ranks (one all-reduce),
  so an N-process step is the same update as a 1-process step with the same global batch;
- the model's loss runs inside DDP (or ``fully_shard`` with ``shard=True``), which reduces
  only the gradients that exist: the adapter's; the frozen base has none;
- checkpoints hold whole tensors whatever the layout (:mod:`tilpass.distributed_checkpoint`),
  so a run resumes with any number of ranks, with or without ``--shard``.

A single process gets the same object with a world of one, and everything here is then a
no-op: the loop has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from tilpass.distributed_checkpoint import full_tensor, gather_state, place_like, reshard
from tilpass.errors import TilpassError
from tilpass.losses import Batch, causal_lm_loss
from tilpass.quantize import is_quantized_module

if TYPE_CHECKING:
    from tilpass.data.packing import BatchPlan
    from tilpass.train_checkpoints import LoadedCheckpoint
    from tilpass.train_config import TrainConfig

BACKENDS = ("auto", "gloo", "nccl")
TIMEOUT_ENV = "TILPASS_DIST_TIMEOUT_S"
# Long enough for every rank to load a 70B base before the first collective.
DEFAULT_TIMEOUT_S = 1800.0


# The exit status of a rank that stops because another rank went away: the launcher's
# summary then names the rank that failed first for another reason.
LOST_RANK_EXIT = 75


class DistributedError(TilpassError, RuntimeError):
    """A distributed run cannot start or cannot go on: wrong backend, a lost rank."""

    exit_code = 2


class LostRankError(DistributedError):
    """Another rank died or stopped answering; this rank stops too."""

    exit_code = LOST_RANK_EXIT


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, local rank (device index), world size."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # None: a single process, no process group
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, logs and writes files; the other ranks only compute."""
        return self.rank == 0

    def device(self) -> str | None:
        """The device this rank loads the model on (None: the loader's default, CPU)."""
        if self.backend == "nccl":
            return f"cuda:{self.local_rank}"
        return "cuda" if self.backend is None and torch.cuda.is_available() else None


def choose_backend(requested: str) -> str:
    """``auto`` -> NCCL with CUDA GPUs, else gloo; a GPU backend without GPUs is an error."""
    if requested not in BACKENDS:
        raise DistributedError(f"--backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise DistributedError(
            "--backend nccl needs CUDA GPUs, but this machine has none that PyTorch can use "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Use --backend "
            "gloo (or auto) to train on CPU, or run on a machine with GPUs and a CUDA build "
            "of PyTorch"
        )
    return requested


SHARD_QUANTIZED = (
    "--shard cannot shard a quantized base (--quantize): FSDP2 would split bitsandbytes' "
    "packed 4-bit weights into plain tensors and drop the quantization state they need. "
    "Train QLoRA without --shard (DDP): the 4-bit base is small enough to fit on every device"
)


def check_engine(shard: bool, quantize: str | None) -> None:
    """Refuse, before anything is launched, an engine that cannot run the config."""
    if shard and quantize is not None:
        raise DistributedError(SHARD_QUANTIZED)


def timeout_seconds() -> float:
    """The collective timeout: ``TILPASS_DIST_TIMEOUT_S`` if set, else 30 minutes."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds > 0")
    return value


def init_world(requested: str = "auto") -> World:
    """Join the process group the launcher set up (``WORLD_SIZE`` > 1), or a world of one."""
    backend = choose_backend(requested)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    timeout = timeout_seconds()
    if size <= 1:
        return World(timeout_s=timeout)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return World(rank, local, size, backend, timeout)


@contextmanager
def world_session(requested: str = "auto") -> Iterator[World]:
    """:func:`init_world` for the block; a lost peer becomes a `DistributedError` naming
    this rank; the process group is closed at the end."""
    world = init_world(requested)
    try:
        yield world
    except RuntimeError as exc:
        if world.backend is None or not lost_rank(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LostRankError(
            f"rank {world.rank} of {world.world_size}: lost contact with the other ranks "
            f"({first}). Another rank died or did not answer within {world.timeout_s:g} s "
            f"({TIMEOUT_ENV}); the launcher's summary names the rank that failed"
        ) from exc
    finally:
        if world.backend is not None and dist.is_initialized():
            dist.destroy_process_group()


def lost_rank(exc: BaseException) -> bool:
    """Whether an error says that a collective lost its peers (gloo, NCCL, a timeout)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(m in text for m in ("gloo", "Connection reset", "Connection closed", "NCCL"))


class LossModule(nn.Module):
    """The model's loss as one module call, so DDP and FSDP see a forward per micro-batch
    (the selective loss calls the decoder and the head separately)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, selective: bool) -> tuple[torch.Tensor, int]:
        """Summed loss over the batch's loss tokens, and their count (`causal_lm_loss`)."""
        return causal_lm_loss(self.model, batch, selective)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the children of its largest ``nn.ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise DistributedError(
            f"--shard needs a model with its layers in an nn.ModuleList; "
            f"{type(model).__name__} has none. Train without --shard (DDP)"
        )
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


@dataclass(frozen=True)
class LocalSlice:
    """This rank's examples of one global micro-batch; ``counts`` False for a stand-in
    example that keeps a rank without examples in step (its loss is masked out)."""

    indices: list[int]
    counts: bool


def rank_slice(indices: list[int], rank: int, world_size: int) -> LocalSlice:
    """Contiguous slice ``rank`` of ``world_size`` near-equal slices of ``indices``."""
    base, extra = divmod(len(indices), world_size)
    start = rank * base + min(rank, extra)
    mine = indices[start : start + base + (rank < extra)]
    return LocalSlice(mine, True) if mine else LocalSlice(indices[:1], False)


def without_loss(batch: Batch) -> Batch:
    """The batch with every label ignored: a forward and backward that change nothing (a
    packed batch's tokens no longer count as trained on either)."""
    out = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    if "real_mask" in batch:
        out["real_mask"] = torch.zeros_like(batch["real_mask"])
    return out


class SilentLog:
    """The metrics log of ranks other than 0: events are dropped (rank 0 writes them)."""

    def write(self, event: dict[str, Any]) -> None:
        """Drop ``event``."""

    def close(self) -> None:
        """Nothing to close."""


class DataParallel:
    """What the training loop asks of the distributed engine (see the module docstring)."""

    def __init__(self, world: World | None = None, *, shard: bool = False) -> None:
        self.world = world or World()
        self.shard = shard
        self.wrapped: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        """Whether this rank writes logs, checkpoints and adapters."""
        return self.world.is_main

    @property
    def size(self) -> int:
        """The number of ranks."""
        return self.world.world_size

    def global_config(self, config: TrainConfig) -> TrainConfig:
        """``config`` with ``batch_size`` the global micro-batch (per device x ranks): the
        unit of the data order, the step plan and the checkpoints' data settings."""
        return replace(config, batch_size=config.batch_size * self.size)

    def banner(self, config: TrainConfig) -> str:
        """The start-up line: world size, engine, and the effective batch across ranks."""
        accum, per_rank = config.gradient_accumulation_steps, config.batch_size
        total = per_rank * accum * self.size
        if self.world.backend is None:
            return (
                f"world size 1: effective batch size {total} "
                f"(batch_size {per_rank} x {accum} accumulation)"
            )
        engine = "FSDP2" if self.shard else "DDP"
        return (
            f"world size {self.size} ({self.world.backend}, {engine}): effective batch size "
            f"{total} ({per_rank} per rank x {self.size} ranks x {accum} accumulation)"
        )

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls for a micro-batch's loss: DDP, FSDP2 or plain."""
        loss = LossModule(model)
        if self.world.backend is None:
            self.wrapped = loss
        elif self.shard:
            self.wrapped = shard_model(loss, model)
        else:
            from torch.nn.parallel import DistributedDataParallel

            device = [self.world.local_rank] if self.world.backend == "nccl" else None
            # Every rank loads the same base from the same files: only the trained tensors are
            # broadcast from rank 0 (DDP's own start-up sync would send the whole base, 128
            # GiB for a 70B), and buffers (rotary tables) are computed alike: no sync per step.
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
            self.wrapped = DistributedDataParallel(
                loss,
                device_ids=device,
                init_sync=False,
                forward_sync_buffers=False,
                find_unused_parameters=False,
            )
        return self.wrapped

    def micro_batch(self, indices: list[int], make: Callable[[list[int]], Batch]) -> Batch:
        """This rank's part of the global micro-batch ``indices``, collated by ``make``."""
        part = rank_slice(indices, self.world.rank, self.size)
        batch = make(part.indices)
        return batch if part.counts else without_loss(batch)

    def packed_step(self, index_groups: list[list[int]], plan: BatchPlan) -> list[Batch]:
        """This rank's packed micro-batches of one optimizer step (``data.packing``).

        The step's examples are split by rank first (contiguous, no overlap, as
        :func:`rank_slice`), then each rank packs its own share into rows of ``max_length``
        tokens, at most its ``batch_size`` rows per micro-batch. The loss is normalised by
        the step's loss tokens over all ranks, as in one process, so the update is the
        single-process packed one. Every rank runs as many micro-batches as the rank with
        the most (DDP and FSDP2 need each forward on every rank): the others add a
        one-example stand-in with its loss masked.
        """
        if self.world.backend is None:
            return plan.micro_batches(index_groups)
        step = [i for group in index_groups for i in group]
        shares = [rank_slice(step, r, self.size) for r in range(self.size)]
        rows = plan.batch_size // self.size  # the plan's batch size is the global one
        count = max(plan.packed_count(share.indices, rows) for share in shares)
        mine = shares[self.world.rank]
        batches = plan.packed(mine.indices, rows)
        if not mine.counts:
            batches = [without_loss(b) for b in batches]
        if len(batches) < count:
            stand_in = without_loss(plan.packed(mine.indices[:1], 1)[0])
            batches += [stand_in] * (count - len(batches))
        return batches

    def sync(self, last: bool) -> AbstractContextManager[Any]:
        """DDP reduces gradients at the last micro-batch of a step only."""
        wrapped = self.wrapped
        if last or self.world.backend is None or self.shard or wrapped is None:
            return nullcontext()
        return wrapped.no_sync()  # type: ignore[operator]

    @property
    def loss_scale(self) -> float:
        """DDP averages gradients over ranks; the loop wants their sum."""
        return float(self.size)

    def sum_counts(self, *counts: int) -> list[int]:
        """Sums over ranks of a few integers (loss tokens, tokens seen), in one all-reduce."""
        if self.world.backend is None:
            return list(counts)
        t = torch.tensor(counts, dtype=torch.int64, device=self.comm_device())
        dist.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor (the step's loss, for the log)."""
        if self.world.backend is None:
            return value
        out = value.detach().to(self.comm_device()).clone()
        dist.all_reduce(out)
        return out.to(value.device)

    def comm_device(self) -> torch.device:
        """Where collectives' tensors live: the rank's GPU for NCCL, else CPU."""
        return torch.device(self.world.device() or "cpu")

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a small picklable object: a path, a run id)."""
        if self.world.backend is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def full_state(
        self, named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer
    ) -> tuple[list[tuple[str, Any]], Any]:
        """Parameters and optimizer with FSDP2 shards gathered whole, for a checkpoint.

        A collective under ``--shard``: every rank calls it, rank 0 writes what it returns.
        """
        if not self.shard or self.world.backend is None:
            return named, optimizer
        return gather_state(named, optimizer)

    def place_checkpoint(
        self, loaded: LoadedCheckpoint, named: list[tuple[str, nn.Parameter]]
    ) -> LoadedCheckpoint:
        """A checkpoint's whole tensors cut into this rank's FSDP2 shards (under ``--shard``;
        as read otherwise), ready to be copied into ``named`` and the optimizer."""
        if not self.shard or self.world.backend is None or self.wrapped is None:
            return loaded
        reshard(self.wrapped)
        return place_like(loaded, named)

    def gather_parameters(self, model: nn.Module) -> None:
        """Replace FSDP2-sharded parameters by whole ones (after training, before saving).

        A collective under ``--shard``; the model is for saving only afterwards.
        """
        if not self.shard or self.world.backend is None:
            return
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                whole = full_tensor(p)
                if whole is not p:
                    setattr(module, name, nn.Parameter(whole, requires_grad=p.requires_grad))

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world.backend is not None:
            dist.barrier()


def shard_model(loss: LossModule, model: nn.Module) -> nn.Module:
    """FSDP2: each transformer block is its own ``fully_shard`` unit; the rest stays whole.

    The blocks' frozen base weights are sharded over the ranks and gathered one block at a
    time; only parameters that require a gradient (the adapter's) get their gradients
    reduce-scattered. Embeddings, final norm and head stay replicated, so they must be
    frozen: their gradients would not be reduced.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    if any(is_quantized_module(m) for block in blocks for m in block.modules()):
        raise DistributedError(SHARD_QUANTIZED)
    inside = {id(p) for block in blocks for p in block.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise DistributedError(
            f"--shard shards the transformer blocks, but {len(outside)} trained tensors lie "
            f"outside them (e.g. {outside[0]}); their gradients would not be reduced. Target "
            "only modules inside the blocks, or train without --shard (DDP)"
        )
    for block in blocks:
        fully_shard(block)
    return loss
