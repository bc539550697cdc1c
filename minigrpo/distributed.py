"""Data parallelism under torchrun: ranks, prompt shards, small collectives, FSDP2 and replicated weights.

    torchrun --nproc_per_node 2 -m minigrpo.train --config configs/X.yaml

Every rank runs the whole loop on its share of each step's prompts: W ranks, B prompts per step, rank r samples
the contiguous prompts shard_range(B, r, W) (groups stay whole), scores them and trains on them; the ranks only
meet in collectives:

- rollout: the per-row totals of rewards (a few floats per row) are gathered so that every rank computes the
  advantages of the GLOBAL batch (scale_rewards="batch" needs the global std) and the global reward metrics;
  the sampled tokens do not depend on the split (counter-based noise);
- update: the loss normaliser sums its counts over ranks (LossNormalizer.all_reduce), so each rank's loss is
  its share of the global sum over the global token (dapo) or sequence (grpo, dr_grpo) count, and the ranks'
  gradients SUM to exactly what one process computes on the whole batch;
- gradients: FSDP2 reduce-scatters them (strategy "fsdp"), or one all-reduce per optimizer step sums the
  replicated trainable gradients (strategy "ddp"). A sum, not the usual average: an average needs each rank's
  loss multiplied by the world size first, and in float16 that factor would overflow the backward at a
  world-size-times smaller loss scale than one process's;
- metrics: each rank's per-row values (`gather_rows`) or partial statistics (`merge_stats`: means, sums,
  extremes) are gathered and combined the same way on every rank.

Strategies.
  fsdp  (full fine-tuning) `fully_shard` on every block and the root, bf16 compute with fp32 sharded parameters
        and fp32 gradient reduction (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)): the optimizer
        steps the fp32 shards, so no separate master copy; each block's RMSNorm gains are a unit gathered in fp32
        (train.fp32_norms). `Transformer.hidden` is registered as an FSDP forward method; the root is not
        resharded after forward (FSDP2's default for the root), so the LM head weight the log-prob kernel reads
        after `hidden` is the gathered one until the backward reshards it.
  ddp   (LoRA; optional for small full fine-tuning) every rank holds all weights; after the last micro-batch
        the trainable gradients are summed, one fp32 all-reduce per bucket. No DistributedDataParallel: it
        syncs only through its own forward (the trainer goes through `hidden` and the LM-head kernel), and
        for adapters (a few MB) overlapping the all-reduce with backward gains nothing.

Generation on sharded weights: `full_weights(model)` all-gathers every unit once for a whole rollout (no
collective per token); peak memory is then the full compute-dtype weights plus the KV cache, as on one GPU.
Passes without a backward (old and reference log-probs) end with `reshard(model)`.

A single process (WORLD_SIZE unset or 1) initialises nothing: World() is rank 0 of 1 and every
helper here is then a no-op or the identity.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from minigrpo.errors import UserError

T = TypeVar("T")
BUCKET_BYTES = 256 * 1024**2  # fp32 gradient bytes per all-reduce of the ddp strategy
EXIT_WAIT_S = 15.0  # how long a failed rank > 0 waits for torchrun to stop it before it reports


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank r of `size`, on `device`."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 1800.0  # distributed.timeout_s: how long a collective waits for the other ranks

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, metrics and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # ---- collectives on host values (no-ops for a single process) ------------------------------

    def all_gather(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; small ones)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def max_int(self, value: int) -> int:
        """The largest `value` over ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def checked_on_every_rank(check: Callable[[], T], wait_s: float = 60.0) -> T:
    """`check()`, a check every rank makes alike (the config and the files, before any weights load),
    with its UserError printed once: by rank 0, which then exits, and torchrun stops the other ranks
    while they wait. A rank > 0 reports its error itself only if it is still running after wait_s
    (rank 0 found nothing: an error of this rank's alone)."""
    try:
        return check()
    except UserError:
        if int(os.environ.get("RANK", "0")) > 0:
            time.sleep(wait_s)
        raise


def init_world(device: torch.device, backend: str = "auto", timeout_s: float = 1800.0) -> World:
    """Join the torchrun job (WORLD_SIZE > 1), or return the single-process World on `device`.

    On CUDA each rank takes the GPU LOCAL_RANK (device "cuda" or "cuda:N" both mean "this rank's
    GPU"); backend "auto" is NCCL on CUDA and gloo on the CPU.
    """
    size = env_world_size()
    if size == 1:
        return World(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        bound = {"device_id": device} if device.type == "cuda" else {}  # NCCL: this rank's GPU, no guessing
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **bound)
    return World(rank=rank, size=size, local_rank=local_rank, device=device, timeout_s=timeout_s)


def close_world(world: World) -> None:
    """Tear the process group down while the interpreter is whole, first dropping what may still
    reference a collective's work (gloo's worker threads hold such work and its tensors; freed during
    interpreter exit instead, they can abort the process). No barrier: on an error path the other
    ranks may never come (the training loop ends with one). Called as an error leaves the run (in a
    `finally`), it makes the job end with one line, not one traceback per rank (`_quiet_exit`)."""
    error = sys.exc_info()[1]
    replacement = _quiet_exit(world, error) if world.distributed and isinstance(error, Exception) else None
    if world.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    if replacement is not None:
        raise replacement from None


def _quiet_exit(world: World, error: Exception) -> UserError | None:
    """What a rank leaving with `error` does so that torchrun's job prints its cause once: the echo of
    another rank's end (a broken collective) waits for torchrun to stop this rank; a UserError or a
    collective timeout is reported by rank 0 at once and by a rank > 0 after a short wait (rank 0
    often meets the same; one of this rank's alone still comes before the others time out). Returns
    the one-line error replacing a collective's failure once the wait ran out (None: `error` stands)."""
    failure = collective_failure(error)
    if failure is None and not isinstance(error, UserError):
        return None  # a bug: its traceback is the report
    if world.rank > 0 or failure == "peer":
        time.sleep(min(EXIT_WAIT_S, world.timeout_s / 2))
    if failure == "timeout":
        return UserError(
            f"rank {world.rank} waited more than distributed.timeout_s={world.timeout_s:g} s for another rank "
            "in a collective: a rank is stuck (a reward, a tool, a step far slower on one rank?)"
        )
    if failure == "peer":
        return UserError(f"rank {world.rank} lost another rank during a collective: that rank's error is above")
    return None


def collective_failure(error: BaseException) -> str | None:
    """What broke a collective: "timeout" (it waited past the group's timeout), "peer" (another rank
    ended) or None (an error of another kind)."""
    text = str(error)
    backend = isinstance(error, RuntimeError) and re.search(r"gloo|nccl|ProcessGroup|c10d", text, re.IGNORECASE)
    if not isinstance(error, dist.DistError) and not backend:
        return None
    return "timeout" if re.search(r"timed out|timeout", text, re.IGNORECASE) else "peer"


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n items; shares differ by at most one item."""
    return rank * n // size, (rank + 1) * n // size


# ------------------------------------------------------------------------------------------------
# the batch's numbers from every rank's share


def gather_rows(world: World, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows, concatenated in rank order, and the index of this rank's first row.

    rows: (N_rank, ...) of this rank -> ((N, ...) on the CPU, fp64 rows kept fp64 (rewards of 0.1 stay 0.1), others
    fp32; start). A single process gets `rows` back unchanged (start 0).
    """
    if not world.distributed:
        return rows, 0
    parts = world.all_gather(rows.detach().to(torch.promote_types(rows.dtype, torch.float32)).cpu())
    start = sum(len(part) for part in parts[: world.rank])
    return torch.cat(parts), start


def combine_stats(parts: Sequence[tuple[dict[str, float], float]]) -> tuple[dict[str, float], float]:
    """Statistics of several parts (micro-batches, ranks) as those of their union, by key suffix:

    `*_min` -> the smallest, `*_max` -> the largest (NaN if a part's is NaN, as torch.min/max: in any order of the
    parts), `*_sum` -> the total, anything else is a mean over its part's `weight` units (tokens, rows) and is
    averaged with those weights. Parts of weight 0 hold no units and are left out, unless no part has any (then each
    counts once). Returns (combined, total weight).
    """
    filled = [(stats, float(w)) for stats, w in parts if w > 0]
    total = sum(w for _, w in filled)
    if not filled:
        filled = [(stats, 1.0) for stats, _ in parts]
    combined: dict[str, float] = {}
    for key in dict.fromkeys(k for stats, _ in filled for k in stats):
        values = [(stats[key], w) for stats, w in filled if key in stats]
        if key.endswith(("_min", "_max")):
            extreme = min if key.endswith("_min") else max
            combined[key] = math.nan if any(math.isnan(v) for v, _ in values) else extreme(v for v, _ in values)
        elif key.endswith("_sum"):
            combined[key] = sum(v for v, _ in values)
        else:
            combined[key] = sum(v * w for v, w in values) / sum(w for _, w in values)
    return combined, total


def merge_stats(world: World, stats: dict[str, float], weight: float) -> tuple[dict[str, float], float]:
    """This rank's statistics combined with every rank's (`combine_stats`); the identity for one process."""
    return combine_stats(world.all_gather((stats, float(weight))))


# ------------------------------------------------------------------------------------------------
# models


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2-sharded modules of `model` (empty when it is not sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2 under this name, hence no sharded model
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_units(model))


def reshard(model: nn.Module) -> None:
    """Shard every unit again after passes without a backward: units kept gathered for one (the root,
    the gain units, blocks not resharded after the forward) would hold the gathered weights till the
    next backward, or for ever on a frozen reference."""
    for unit in fsdp_units(model):
        unit.reshard()


def shard_model(
    model: nn.Module,
    world: World,
    *,
    compute_dtype: torch.dtype,
    reshard_after_forward: bool = True,
    fp32_norms: bool = True,
) -> nn.Module:
    """FSDP2 in place: every block is a unit, the root holds embedding, final norm and LM head. Parameters keep
    their dtype (fp32: the optimizer's masters); passes compute in `compute_dtype`, inputs uncast (the rotary
    angles stay fp32); gradients are reduce-scattered in fp32 and summed (the module docstring). fp32_norms: the
    RMSNorm gains run in fp32, as on one process (`_shard_gains`). Returns the same module object."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(world.device.type, (world.size,))
    param_dtype = None if compute_dtype == torch.float32 else compute_dtype
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    gains = replace(policy, param_dtype=None) if fp32_norms and param_dtype is not None else None  # fp32 gathers
    for block in model.model.layers:
        _shard_gains(block, mesh, gains)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    _shard_gains(model.model.norm, mesh, gains)
    # root: kept gathered from forward to backward, so the LM head read after hidden() is whole
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden")
    for unit in fsdp_units(model):
        _sum_gradients(unit)
    return model


def _shard_gains(module: nn.Module, mesh: Any, policy: Any) -> None:
    """With a policy, the fp32 RMSNorm gains in `module` (a block's 2, 4 with q/k norms; the final norm) become one
    unit gathered in fp32 (a unit's policy casts all its parameters; in bf16 a gain cannot move by an lr-sized step):
    one all-gather and reduce-scatter (a few KB) more per block and micro-batch; kept gathered until the backward."""
    from torch.distributed.fsdp import fully_shard

    from minigrpo.models.transformer import RMSNorm

    norms = [m for m in module.modules() if isinstance(m, RMSNorm) and m.weight.dtype == torch.float32]
    if policy is not None and norms:
        fully_shard(norms, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def _sum_gradients(unit: nn.Module) -> None:
    """Make an FSDP unit's reduce-scatter a plain sum of the ranks' gradients (not FSDP's average)."""
    if hasattr(unit, "set_gradient_divide_factor"):
        unit.set_gradient_divide_factor(1.0)
    else:  # the name before torch 2.8
        unit.set_reduce_scatter_divide_factor(1.0)
    force_sum = getattr(unit, "set_force_sum_reduction_for_comms", None)
    if force_sum is not None:  # a SUM, not a pre-multiplied one (gloo has none)
        force_sum(True)


@torch.no_grad()
def broadcast_trainable(model: nn.Module, world: World) -> None:
    """Copy rank 0's trainable parameters to every rank (replicated weights must start equal)."""
    if not world.distributed:
        return
    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src=0)


@contextmanager
def full_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Gather an FSDP2-sharded model for code that is not a training forward (the sampler's decoding).

    Yields a plain module of the model's own class whose parameters ARE the gathered full tensors (compute dtype;
    fp32 gains; no copy) and which carries no FSDP hooks: decoding on it never communicates or reshards, and can
    be captured in CUDA graphs. All ranks enter together (the gathers are collectives); the shards come back when
    the block ends. Nested use yields the same view; a model that is not sharded is yielded itself."""
    units = fsdp_units(model)
    view = model.__dict__.get("_full_weights_view")
    if not units or view is not None:
        yield view if view is not None else model
        return
    try:
        for unit in units:
            unit.unshard()
        view = _unhooked_view(model)
        object.__setattr__(model, "_full_weights_view", view)  # a plain attribute, not a submodule
        yield view
    finally:
        model.__dict__.pop("_full_weights_view", None)
        for unit in units:
            unit.reshard()


def _unhooked_view(model: nn.Module) -> nn.Module:
    """A module of model's original class built on the meta device, whose parameters are set to the
    model's current (gathered) ones; the rotary angles module is shared as it is."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    with torch.device("meta"):
        view = cls(model.args)
    view.rotary = model.rotary
    for name, p in model.named_parameters():
        path, _, attr = name.rpartition(".")
        setattr(view.get_submodule(path), attr, p)
    view.train(model.training)
    return view


@torch.no_grad()
def all_reduce_gradients(params: Sequence[nn.Parameter], world: World) -> None:
    """Sum the gradients of replicated parameters over ranks (strategy "ddp"), in fp32 buckets.

    A parameter that has a gradient on some rank but not on this one contributes zeros; one without
    a gradient on every rank keeps `grad=None` (the optimizer then skips it, as one process would).
    """
    if not world.distributed:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=world.device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h]
    bucket, size = [], 0
    for p in live:
        bucket.append(p)
        size += p.numel() * 4
        if size >= BUCKET_BYTES:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(params: list[nn.Parameter]) -> None:
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # on the gradients' device (CUDA for NCCL, CPU for gloo)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        g = g.view_as(p).to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad.copy_(g)


@torch.no_grad()
def clip_grad_norm(params: Sequence[nn.Parameter], max_norm: float, grad_scale: float = 1.0) -> float:
    """Clip the global L2 gradient norm to max_norm (inf: only measure it); returns the norm before.

    grad_scale: the loss scale the gradients carry (minigrpo/grad_scale.py); they are divided by it
    in the same multiply as the clip, and the norm returned and clipped is the unscaled one. A
    non-finite norm (an overflow, a NaN) is returned and the gradients are left as they are.
    """
    norm = global_grad_norm(params, grad_scale)
    if math.isfinite(norm):
        scale_gradients(params, clip_factor(norm, max_norm) / grad_scale)
    return norm


def global_grad_norm(params: Sequence[nn.Parameter], grad_scale: float = 1.0) -> float:
    """The L2 norm of all gradients together, divided by grad_scale; the same number on every rank.

    Each tensor's norm is taken in fp32 (a bf16 norm is 0.2-0.4% off) and the squares summed in fp64. Sharded
    (DTensor, FSDP2) gradients contribute the sum of squares of their local shards, summed over ranks with one
    all-reduce; replicated gradients count once, so one process and any number of ranks measure alike. Give the
    parameters as they are after backward (FSDP2 swaps parameter objects between sharded and unsharded states).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    device = _local(grads[0]).device
    squares = torch.zeros((), dtype=torch.float64, device=device)
    sharded = [g for g in grads if _is_sharded_tensor(g)]
    for g in sharded:
        squares += torch.linalg.vector_norm(_local(g), dtype=torch.float32).double().square().to(device)
    if sharded:
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=sharded[0].device_mesh.get_group())
    for g in grads:
        if not _is_sharded_tensor(g):
            squares += torch.linalg.vector_norm(_local(g), dtype=torch.float32).double().square().to(device)
    return float(squares.sqrt()) / grad_scale


def clip_factor(norm: float, max_norm: float) -> float:
    """What multiplies the gradients so that their norm is at most max_norm (1 when it already is)."""
    return min(1.0, max_norm / (norm + 1e-6))


def scale_gradients(params: Sequence[nn.Parameter], factor: float) -> None:
    """Multiply every gradient in place by factor (a float kept in fp32: _foreach_mul_ would round
    it to a bf16 gradient's dtype first)."""
    if factor != 1.0:
        for p in params:
            if p.grad is not None:
                _local(p.grad).mul_(factor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _is_sharded_tensor(t: torch.Tensor) -> bool:
    """A DTensor split over ranks (not replicated on all of them)."""
    from torch.distributed.tensor import DTensor, Replicate

    return isinstance(t, DTensor) and not all(isinstance(pl, Replicate) for pl in t.placements)


@torch.no_grad()
def full_state_dict(module: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU, on rank 0 (other ranks get {}): sharded tensors are gathered one
    by one, so no rank ever holds more than one full tensor beyond its shards."""
    out = {}
    for name, t in module.state_dict().items():
        t = full_tensor(t)  # every rank takes part in a sharded tensor's gather
        if world.main:
            out[name] = t.detach().cpu()
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor gathered whole (a collective), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the whole tensor, the same on every rank) laid out as `like`: this rank's shard when
    `like` is a DTensor of the same global shape, else `full` on like's device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and tuple(full.shape) == tuple(like.shape):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return full.to(like.device)
