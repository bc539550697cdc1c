"""Memory pre-flight of one rank of a torchrun job (memory_ranks.py): its share of the batch, and
under FSDP2 its shards and the units it gathers; the suggestions keep to what a launch accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from minigrpo.config import load_config
from minigrpo.config_rules import distributed_errors
from minigrpo.distributed import BUCKET_BYTES
from minigrpo.memory import MemoryPreflightError, estimate_peak, preflight, suggest_fixes
from minigrpo.memory_ranks import block_params, fsdp_gathered, rank_prompts, root_params
from minigrpo.models.args import ModelArgs
from minigrpo.models.presets import preset_config

CONFIGS = Path(__file__).parents[1] / "configs"
QWEN15 = ModelArgs.from_hf_config(preset_config("qwen2.5-1.5b"))
GiB = 2**30
KW = {"prompt_tokens": 256}


def _cfg(*overrides: str, lora: bool = False):
    name = "qwen2.5-1.5b_gsm8k_lora.yaml" if lora else "qwen2.5-1.5b_gsm8k.yaml"
    return load_config(CONFIGS / name, list(overrides))


def test_a_rank_samples_the_largest_contiguous_share():
    assert [rank_prompts(b, 2) for b in (2, 3, 4, 5)] == [1, 2, 2, 3]
    assert rank_prompts(16, 1) == 16 and rank_prompts(16, 3) == 6


def test_ddp_rank_is_one_process_with_its_share_plus_the_all_reduce_bucket():
    """LoRA replicates the model: a rank of W holds what one process holds for ceil(B / W) prompts, and
    before the step the gradients' fp32 all-reduce bucket (the adapters are smaller than one bucket)."""
    cfg = _cfg("grpo.prompts_per_step=8", "train.micro_batch_size=8", lora=True)
    alone = estimate_peak(
        _cfg("grpo.prompts_per_step=4", "train.micro_batch_size=8", lora=True), QWEN15, prompt_tokens=256
    )
    ranked = estimate_peak(cfg, QWEN15, prompt_tokens=256, world_size=2)
    for phase in ("rollout", "logprobs", "update", "optimizer"):
        assert ranked.phases[phase] == alone.phases[phase], phase
    adapters = ranked.parts["lora_adapters"] // 4
    assert ranked.parts["gradient_all_reduce"] == 4 * adapters < BUCKET_BYTES
    assert ranked.phases["all_reduce"] == ranked.phases["optimizer"] - ranked.parts["optimizer_step_transient"] + (
        4 * adapters
    )
    # an odd count: the larger share (3 of 5) sizes the rank
    odd = estimate_peak(
        _cfg("grpo.prompts_per_step=5", "train.micro_batch_size=8", lora=True), QWEN15, **KW, world_size=2
    )
    three = estimate_peak(_cfg("grpo.prompts_per_step=3", "train.micro_batch_size=8", lora=True), QWEN15, **KW)
    assert odd.parts["kv_cache"] == three.parts["kv_cache"] and odd.phases["rollout"] == three.phases["rollout"]


def test_fsdp_rank_holds_shards_and_gathers_units():
    """Full fine-tuning on W ranks (FSDP2): fp32 parameters (the masters), fp32 gradients and AdamW's
    moments in W shards, 4 + 4 + 8 bytes a parameter / W; no separate master copy; the sampler decodes
    on the whole bf16 model (its RMSNorm gains fp32: train.fp32_norms); training gathers the root, two
    blocks and every block's gains (a unit of their own, gathered until its backward)."""
    P, D, L = QWEN15.num_params(), QWEN15.dim, QWEN15.n_layers
    gains = L * 2 * D + D  # two norms a block and the final one
    cfg = _cfg()
    one = estimate_peak(cfg, QWEN15, prompt_tokens=256)
    for W in (2, 4, 8):
        est = estimate_peak(cfg, QWEN15, prompt_tokens=256, world_size=W)
        shard = -(-P // W)
        assert est.parts["weights"] == 4 * shard and est.parts["optimizer_state"] == 8 * shard
        assert est.parts["master_weights"] == 0 and est.parts["gradients"] == 4 * shard
        assert est.parts["gathered_for_sampling"] == 2 * (P - gains) + 4 * gains  # bf16, fp32 gains
        gathered = fsdp_gathered(QWEN15, cfg, 2)
        units = 2 * (root_params(QWEN15) - D + 2 * (block_params(QWEN15) - 2 * D)) + 4 * gains
        assert est.parts["gathered_units"] == units == gathered["forward"]
        assert est.total < one.total
    # the parameter count splits into the root and n_layers equal blocks
    assert root_params(QWEN15) + QWEN15.n_layers * block_params(QWEN15) == P
    # without resharding after the forward every block stays gathered until its backward
    whole = estimate_peak(_cfg("distributed.reshard_after_forward=false"), QWEN15, prompt_tokens=256, world_size=2)
    assert whole.parts["gathered_units"] == 2 * (P - gains) + 4 * gains
    assert whole.phases["update"] > estimate_peak(cfg, QWEN15, prompt_tokens=256, world_size=2).phases["update"]


def test_suggestions_on_ranks_pass_the_launch_checks():
    """A full fine-tuning run replicated with ddp on 4 ranks that does not fit: the error names FSDP
    (which fits), never a prompt count below the ranks, and each suggestion passes distributed_errors."""
    cfg = _cfg("distributed.strategy=ddp", "grpo.prompts_per_step=4", "train.micro_batch_size=8")
    est = estimate_peak(cfg, QWEN15, prompt_tokens=256, world_size=4)
    budget = int(est.total * 0.8)
    fixes = suggest_fixes(cfg, QWEN15, prompt_tokens=256, budget=budget, world_size=4)
    chosen = {key: new for key, _, new, _ in fixes}
    assert chosen.get("distributed.strategy") == "fsdp", fixes
    assert chosen.get("grpo.prompts_per_step", 4) >= 4
    for key, _, new, total in fixes:
        changed = load_config(
            CONFIGS / "qwen2.5-1.5b_gsm8k.yaml",
            [
                "distributed.strategy=ddp",
                "grpo.prompts_per_step=4",
                "train.micro_batch_size=8",
                f"{key}={str(new).lower()}",
            ],
        )
        assert not distributed_errors(changed, 4), key
        assert estimate_peak(changed, QWEN15, prompt_tokens=256, world_size=4).total == total <= budget, key


def test_preflight_on_ranks_names_them_and_fsdp_only_warns(capsys):
    cfg = _cfg("distributed.strategy=ddp")
    need = estimate_peak(cfg, QWEN15, prompt_tokens=256, world_size=2).total
    with pytest.raises(MemoryPreflightError, match=r"each of the 2 ranks' device"):
        preflight(cfg, QWEN15, "cuda", 256, free_bytes=need // 2, verbose=False, world_size=2)
    sharded = _cfg()
    est = preflight(sharded, QWEN15, "cuda", 256, free_bytes=GiB, world_size=2, refuse=False)
    out = capsys.readouterr().out
    assert "warning: a training step is predicted to need" in out and est.total > GiB
    preflight(sharded, QWEN15, "cuda", 256, free_bytes=GiB, world_size=2, refuse=False, verbose=False)
    assert capsys.readouterr().out == ""  # other ranks stay quiet


def test_distributed_errors_are_the_launch_checks():
    assert distributed_errors(_cfg("grpo.prompts_per_step=1", "train.micro_batch_size=8"), 1) == []
    errors = distributed_errors(
        _cfg("grpo.prompts_per_step=1", "train.micro_batch_size=8", "train.optimizer=adamw8bit"), 2
    )
    assert len(errors) == 2 and "grpo.prompts_per_step (1)" in errors[0] and "adamw8bit" in errors[1]
