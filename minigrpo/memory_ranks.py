"""Memory of one rank of a torchrun job: its share of the batch and, under FSDP2, its shards.

The pre-flight (memory.py) predicts a rank's peak as one process's, changed where the strategy
changes what a device holds (build.build_run, distributed.py):

- every rank samples and trains a contiguous share of the step's prompts (distributed.shard_range:
  shares differ by one prompt at most), so the largest share, ceil(B / W), sizes its KV cache and
  micro-batches;
- "ddp" replicates the model: weights, gradients and optimizer state as one process holds them,
  plus the gradient all-reduce, which sums fp32 buckets of distributed.BUCKET_BYTES (one parameter
  past the limit at most) beside the gradients;
- "fsdp" keeps fp32 parameters (they are the optimizer's masters), their fp32 gradients and AdamW's
  state in W shards, the frozen reference alike; a forward gathers the root (embedding, final norm,
  LM head, kept from forward to backward) and the blocks in compute dtype, two at a time (the one
  running and the one prefetched), or all of them when blocks are not resharded after the forward;
  a block's backward holds its unsharded gradients and their fp32 copy for the reduce-scatter; and
  the sampler decodes on the whole model gathered in compute dtype (distributed.full_weights), as a
  weight sync to vLLM does.
- with a 16-bit compute dtype and train.fp32_norms, each block's RMSNorm gains (and the final norm's)
  are a unit of their own gathered in fp32 (distributed._shard_gains) and not resharded after the
  forward: every block's stay gathered from its forward to its backward. A pass without gradients
  (old and reference log-probs) has no backward: those passes end by resharding every unit
  (distributed.reshard), so they leave nothing gathered.
"""

from __future__ import annotations

from minigrpo.config import Config
from minigrpo.models.args import ModelArgs


def rank_prompts(prompts_per_step: int, world_size: int) -> int:
    """The most prompts a rank samples in a step: the largest of the W contiguous shares."""
    return -(-prompts_per_step // max(world_size, 1))


def all_reduce_bytes(numel: int, largest: int, bucket_bytes: int | None = None) -> int:
    """The fp32 bucket of the ddp gradient all-reduce (distributed.all_reduce_gradients): parameters
    join it until it reaches bucket_bytes, so it holds at most that plus the last one; never more
    than every trained value."""
    from minigrpo.distributed import BUCKET_BYTES

    limit = BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    return min(4 * numel, limit + 4 * largest)


def root_params(args: ModelArgs) -> int:
    """Parameters of FSDP's root unit: the embedding, the final norm and an untied LM head."""
    head = 0 if args.tie_word_embeddings else args.vocab_size * args.dim
    return args.vocab_size * args.dim + args.dim + head


def block_params(args: ModelArgs) -> int:
    """Parameters of one transformer block (an FSDP unit of its own)."""
    return (args.num_params() - root_params(args)) // args.n_layers


def fsdp_static(args: ModelArgs, cfg: Config, world_size: int, reference: bool) -> dict[str, int]:
    """A rank's share of what the sharded policy holds all run (replacing trainer_bytes' parts):
    fp32 parameter shards as `weights` (the masters: no separate master copy), AdamW's two fp32
    moments, the reference's fp32 shards; `gradients` (fp32 shards) and `numel` (the values this
    rank's optimizer steps)."""
    n = -(-args.num_params() // world_size)  # a rank's shard (FSDP pads the last)
    return {
        "weights": 4 * n,
        "master_weights": 0,
        "optimizer_state": 8 * n,
        "reference_model": 4 * n if reference else 0,
        "gradients": 4 * n,
        "numel": n,
    }


def fp32_gain_params(args: ModelArgs, cfg: Config, b: int) -> tuple[int, int]:
    """(per block, final norm) RMSNorm gains FSDP gathers in fp32 as units of their own: with a 16-bit
    compute dtype (b < 4) and train.fp32_norms; (0, 0) otherwise, when they are gathered with their
    block or the root in the compute dtype (distributed.shard_model)."""
    if b >= 4 or not cfg.train.fp32_norms:
        return 0, 0
    return 2 * args.dim + (2 * args.head_dim if args.qk_norm else 0), args.dim


def fsdp_gathered(args: ModelArgs, cfg: Config, b: int) -> dict[str, int]:
    """What an FSDP2 rank gathers beyond its shards, by the phase that holds it:
    `sampling` the whole model (compute dtype, fp32 gains); `forward` the root and the blocks in flight
    (two, or all without resharding after the forward) and every fp32 gain unit (gathered until their
    backward); `backward` the root's unsharded gradients (the LM head's come first in the backward and
    stay until the root reduces, last), one block's, and the fp32 copy the reduce-scatter makes of the
    largest unit's."""
    gains, final = fp32_gain_params(args, cfg, b)
    root, block = root_params(args) - final, block_params(args) - gains  # gathered in compute dtype
    fp32_units = 4 * (args.n_layers * gains + final)
    resharded = cfg.distributed.reshard_after_forward
    blocks = min(2, args.n_layers) if resharded else args.n_layers
    return {
        "sampling": b * (root + args.n_layers * block) + fp32_units,
        "forward": b * (root + blocks * block) + fp32_units,
        "backward": b * (root + block) + 4 * (gains + final) + 4 * max(root, block),
    }
