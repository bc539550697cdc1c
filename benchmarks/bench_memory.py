"""Peak memory and speed of one GRPO update on long completions, against a naive loop and TRL.

    python benchmarks/bench_memory.py                 # every case (H100: about 16 min)
    python benchmarks/bench_memory.py --quick         # small smoke run (CPU or GPU, ~1 min) [--out-dir DIR]
    python benchmarks/bench_memory.py --cases qwen-lora-4k,llama-qlora-20k --no-bisect

Each case builds a real architecture with random weights (presets.py), attaches rank-32 adapters
(minigrpo.lora) on every block linear, and trains one GRPO step on a fixed synthetic rollout:
1 prompt x 8 completions of exactly `completion` tokens (sampling skipped), through
`minigrpo.train.update_phase`. The step runs twice; the second is measured: peak allocated and
reserved bytes, training tokens/s, and the pre-flight prediction (memory.estimate_peak,
update/optimizer phases) next to the measured peak.

Providers per case:
    ours        chunked log-prob kernel, block checkpointing, inputs offloaded to CPU (optional)
    naive       full (N, T, V) logits in fp32, log_softmax + gather, no checkpointing
    trl         TRL GRPOTrainer.compute_loss on the same transformers model + PEFT LoRA, set up as
    trl_liger   Trainer.train() does (checkpointing), without and with Liger's layer kernels
                (skipped when trl, transformers, peft or liger-kernel are missing)
Then, for Llama-3.1-8B QLoRA with 8 generations, the longest completion for which a whole step
fits: the rollout (sampler prefill, full-length KV cache, decode steps) and the update measured at
the pre-flight's predicted limit, and the update alone at its own (see longest_completion).

Every case runs under try/except: an out-of-memory is recorded as "OOM", any other failure as its
message, a case over its time limit as "timeout"; the CUDA cache is emptied between cases.
Writes results/memory_<device>.json (rows of cases not run this time are kept from the file's
earlier version, marked as such) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    DEVICE,
    RESULTS,
    device_slug,
    environment,
    names,
    out_folder,
    positive_float,
    positive_int,
    print_table,
    sync,
    write_result,
)

from minigrpo import grpo
from minigrpo.config import load_config
from minigrpo.errors import ArgumentParser, run_cli
from minigrpo.lora import apply_lora
from minigrpo.memory import GiB, estimate_peak
from minigrpo.models.loading import build_random
from minigrpo.models.presets import preset_config
from minigrpo.optim import build_optimizer, build_scheduler
from minigrpo.quant import quantize_model_linears
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams
from minigrpo.sampling.rollout import Rollout
from minigrpo.step import Batch, update_phase

# Small architectures for --quick (dims multiples of 64: bitsandbytes' CPU 4-bit path needs them).
QUICK_ARCH = {
    "model_type": "llama",
    "hidden_act": "silu",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


@dataclass
class Case:
    name: str
    arch: str  # preset name, or "quick"
    completion: int  # Tc: every completion has exactly this many tokens
    quantize: str | None = None
    micro_batch: int = 1
    offload: bool = True
    prompt: int = 256  # Tp
    group: int = 8  # G completions of one prompt
    providers: tuple[str, ...] = ("ours", "naive", "trl", "trl_liger")
    time_limit_s: int = 600
    runs: int = 2  # the last run is measured (the first compiles kernels and creates optimizer state)


FULL_CASES = [
    Case("qwen-lora-1k", "qwen2.5-1.5b", 1024, micro_batch=8, offload=False),
    Case("qwen-lora-4k", "qwen2.5-1.5b", 4096, micro_batch=2),
    Case("qwen-lora-16k", "qwen2.5-1.5b", 16384, micro_batch=1),
    Case("llama-qlora-20k", "llama-3.1-8b", 20000, quantize="nf4", micro_batch=1, time_limit_s=900),
]
QUICK_CASES = [
    Case("quick-lora-256", "quick", 256, micro_batch=4, offload=False, prompt=32, time_limit_s=120),
    Case("quick-qlora-512", "quick", 512, quantize="nf4", micro_batch=2, prompt=32, time_limit_s=120),
]


MEMORY_CAP: int | None = None  # bytes the device may use (--memory-gib), None: all of it


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise CaseTimeout in the main thread after `seconds` (checked between Python bytecodes)."""

    def fire(signum, frame):
        raise CaseTimeout(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ================================================================================================
# models and adapters


def attach_adapters(model, cfg) -> None:
    """Rank-32 adapters on every block linear (minigrpo.lora), base weights frozen."""
    model.requires_grad_(False)
    apply_lora(model, cfg.lora)


def arch_config(arch: str) -> dict:
    """The HF config dict of a preset name, or of the small --quick architecture."""
    return dict(QUICK_ARCH) if arch == "quick" else preset_config(arch)


def update_peak(est) -> int:
    """The pre-flight's peak of a training update: the backward or the optimizer step."""
    return max(est.phases["update"], est.phases["optimizer"])


def build_model(case: Case, dtype: torch.dtype):
    hf = arch_config(case.arch)
    model = build_random(hf, dtype=dtype, device=DEVICE)
    if case.quantize:
        quantize_model_linears(model, case.quantize)  # in place, one layer at a time
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return model, hf


def make_cfg(case: Case, *, checkpointing: bool, offload: bool):
    opt = "adamw8bit" if case.quantize and DEVICE.type == "cuda" else "adamw"
    overrides = [
        f"run.device={DEVICE.type}",
        "lora.enabled=true",
        "lora.r=32",
        "lora.alpha=64",
        f"lora.quantize_base={case.quantize or 'null'}",
        f"train.optimizer={opt}",
        f"train.micro_batch_size={case.micro_batch}",
        "grpo.prompts_per_step=1",
        f"grpo.group_size={case.group}",
        f"sampler.max_new_tokens={case.completion}",
        f"model.gradient_checkpointing={str(checkpointing).lower()}",
        "train.lr=1e-5",
    ]
    overrides.append(f"model.activation_offload={str(offload).lower()}")
    return load_config(None, overrides)


def synthetic_batch(case: Case, vocab: int, *, one_long: bool = False) -> Batch:
    """1 prompt x G completions of exactly Tc tokens (one_long: only the first; the others one token),
    random ids, random advantages (a spread)."""
    N, Tp, Tc = case.group, case.prompt, case.completion
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, vocab - 10, (1, Tp), generator=g).repeat(N, 1)
    completion_mask = torch.ones(N, Tc, dtype=torch.long)
    if one_long:
        completion_mask[1:, 1:] = 0
    rollout = Rollout(
        prompt_ids=prompt,
        prompt_mask=torch.ones(N, Tp, dtype=torch.long),
        completion_ids=torch.randint(10, vocab - 10, (N, Tc), generator=g),
        completion_mask=completion_mask,
        sampler_logp=torch.zeros(N, Tc),
        truncated=torch.zeros(N, dtype=torch.bool),
        completion_texts=[""] * N,
        prompt_index=torch.zeros(N, dtype=torch.long),
        group_size=N,
    ).to(DEVICE)
    rewards = torch.rand(N, generator=g)
    adv = grpo.group_advantages(rewards, N)
    return Batch(rollout=rollout, rewards=rewards, advantages=adv, reward_metrics={}, prompts=[], answers=[])


# ================================================================================================
# providers: one training step each


def naive_update(cfg, model, optimizer, batch: Batch) -> None:
    """The textbook loop: full logits (N, T, V) -> fp32 log_softmax -> gather, no checkpointing."""
    r, g = batch.rollout, cfg.grpo
    mask = r.completion_mask.float()
    advantages = batch.advantages.to(mask.device)
    Tp, Tc = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    normalizer = grpo.make_normalizer(
        r.completion_mask,
        g.loss_type,
        max_completion_length=Tc,
        num_micro_batches=r.num_sequences // cfg.train.micro_batch_size,
    )
    opts = grpo.LossOptions(loss_type=g.loss_type, epsilon=g.epsilon, epsilon_high=g.epsilon_high)
    model.train()
    for start in range(0, r.num_sequences, cfg.train.micro_batch_size):
        rows = slice(start, start + cfg.train.micro_batch_size)
        ids = torch.cat([r.prompt_ids[rows], r.completion_ids[rows]], 1)
        logits = model(ids, attention_mask=torch.ones_like(ids))[:, Tp - 1 : -1].float()  # (n, Tc, V)
        logp = logits.log_softmax(-1).gather(-1, r.completion_ids[rows, :, None]).squeeze(-1)
        loss, _ = grpo.policy_loss(logp, None, advantages[rows], mask[rows], opts, normalizer=normalizer)
        loss.backward()
        del logits, logp, loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def placeholder_tokenizer():
    """A three-word transformers tokenizer: TRL >= 1.0 wants one (pad and eos ids) and would otherwise
    fetch it from the hub by the model's name, which a random-weights model does not have."""
    import transformers
    from tokenizers import Tokenizer, models

    words = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "x": 2}, unk_token="x"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>")


def prepare_like_train(trainer, liger: bool) -> None:
    """What Trainer.train() sets up before its first step; the benchmark calls compute_loss directly."""
    model = trainer.model
    model.train()  # transformers checkpoints blocks only in training mode
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if liger and getattr(
        trainer.args, "use_liger_kernel", False
    ):  # the layer kernels (RMSNorm, RoPE, SwiGLU); TRL keeps its own chunked LM head
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        _apply_liger_kernel_to_instance(model=base, **(trainer.args.liger_kernel_config or {}))
    if not hasattr(trainer, "current_gradient_accumulation_steps"):  # TRL >= 1.0 sets it in training_step
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps


def trl_update(case: Case, hf: dict, batch: Batch, liger: bool) -> dict[str, Any]:
    """TRL's GRPOTrainer.compute_loss + backward on a transformers model with PEFT LoRA."""
    import datasets
    import transformers
    from peft import LoraConfig, get_peft_model
    from trl import GRPOConfig, GRPOTrainer

    if case.quantize:
        return {"status": "n/a (TRL case builds a bf16 base)"}
    if liger and DEVICE.type != "cuda":
        return {"status": "n/a (Liger's kernels need CUDA)"}
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(DEVICE)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = GRPOConfig(
        output_dir="/tmp/bench_memory_trl",
        per_device_train_batch_size=case.micro_batch,
        **({"generation_batch_size": case.group} if "generation_batch_size" in GRPOConfig.__dataclass_fields__ else {}),
        num_generations=case.group,
        max_completion_length=case.completion,
        gradient_checkpointing=True,
        bf16=DEVICE.type == "cuda",
        use_cpu=DEVICE.type == "cpu",
        # TRL < 1.0: the Liger GRPO loss; TRL >= 1.0 computes chunked log-probs itself and offers Liger's layer kernels
        **{("use_liger_loss" if "use_liger_loss" in GRPOConfig.__dataclass_fields__ else "use_liger_kernel"): liger},
        beta=0.0,
        loss_type="dapo",
        report_to=[],
    )
    data = datasets.Dataset.from_dict({"prompt": ["x"] * case.group})
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args,
        train_dataset=data,
        processing_class=placeholder_tokenizer(),  # random weights: the steps are fed token ids directly
    )
    prepare_like_train(trainer, liger)
    r = batch.rollout

    def step():
        for start in range(0, r.num_sequences, case.micro_batch):
            rows = slice(start, start + case.micro_batch)
            inputs = {
                "prompt_ids": r.prompt_ids[rows],
                "prompt_mask": r.prompt_mask[rows],
                "completion_ids": r.completion_ids[rows],
                "completion_mask": r.completion_mask[rows],
                "advantages": batch.advantages[rows].to(DEVICE),
                "old_per_token_logps": None,
                "num_items_in_batch": r.completion_mask.sum(),
            }
            trainer.compute_loss(trainer.model, inputs).backward()
        trainer.model.zero_grad(set_to_none=True)

    return measure(step, case.runs)


# ================================================================================================
# measuring


def measure(step, runs: int = 2) -> dict[str, Any]:
    """Run `step` `runs` times; time and peak memory of the last run."""
    for _ in range(runs - 1):
        step()
    sync()
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    sync()
    out: dict[str, Any] = {"status": "ok", "step_s": time.perf_counter() - t0}
    if DEVICE.type == "cuda":
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GiB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    return out


def run_ours(case: Case, dtype: torch.dtype, *, naive: bool = False) -> dict[str, Any]:
    model, hf = build_model(case, dtype)
    cfg = make_cfg(case, checkpointing=not naive, offload=case.offload and not naive)
    attach_adapters(model, cfg)
    model.gradient_checkpointing = not naive
    model.activation_offload = case.offload and not naive
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, 10)
    batch = synthetic_batch(case, hf["vocab_size"])
    if naive:
        out = measure(lambda: naive_update(cfg, model, optimizer, batch), case.runs)
    else:
        out = measure(lambda: update_phase(cfg, model, optimizer, scheduler, batch, None, None), case.runs)
    est = estimate_peak(cfg, model.args, prompt_tokens=case.prompt, device_type=DEVICE.type)
    if not naive:
        out["predicted_gib"] = update_peak(est) / GiB
        out["predicted_rollout_gib"] = est.phases["rollout"] / GiB
        out["predicted_kv_cache_gib"] = est.parts["kv_cache"] / GiB
    return out


def run_case(case: Case, provider: str, dtype: torch.dtype) -> dict[str, Any]:
    tokens = case.group * (case.prompt + case.completion)
    row: dict[str, Any] = {"case": case.name, "provider": provider, "completion": case.completion}
    row["micro_batch"] = case.micro_batch
    try:
        with time_limit(case.time_limit_s):
            if provider in ("ours", "naive"):
                row |= run_ours(case, dtype, naive=provider == "naive")
            else:
                hf = arch_config(case.arch)
                row |= trl_update(case, hf, synthetic_batch(case, hf["vocab_size"]), liger=provider == "trl_liger")
        if row.get("step_s"):
            row["tokens_per_s"] = tokens / row["step_s"]
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except ImportError as e:
        row["status"] = f"skipped ({e.name or e} not installed)"
    except CaseTimeout as e:
        row["status"] = f"timeout ({e})"
    except Exception as e:  # record and go on: one broken provider must not end the run
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        traceback.print_exc(limit=4)  # on the console only: its file paths are this machine's
    finally:
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


class ProbeSampler(KVCacheSampler):
    """The own sampler's prefill and full-length KV cache, then a few decode steps at the longest key
    length: the rollout's memory without generating every token (its time is not measured)."""

    def _decode(self, st, Tp: int, params: SamplingParams) -> tuple[int, dict[str, float]]:
        for _ in range(3):
            self._step(st, st.mask.shape[1], params)
        return 4, dict(compactions=0.0, graph_captures=0.0, capture_s=0.0)  # tokens drawn per row, loop counts


class _NoText:
    """Tokenizer stand-in for the probe sampler: pad id 0, texts never read."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def probe_case(base: Case, tc: int, group: int) -> Case:
    """A probe of `tc` completion tokens: one completion per micro-batch, `group` per prompt."""
    return Case(f"longest-{tc}", base.arch, tc, quantize=base.quantize, micro_batch=1, prompt=base.prompt, group=group)


def probe_update(model, base: Case, tc: int, vocab: int) -> dict[str, Any]:
    """One update on 2 completions (a group needs two): one of `tc` tokens and one of a single token;
    the peak is that of the long micro-batch, whatever the number of completions."""
    case = probe_case(base, tc, group=2)
    cfg = make_cfg(case, checkpointing=True, offload=True)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, 10)
    batch = synthetic_batch(case, vocab, one_long=True)
    out = measure(lambda: update_phase(cfg, model, optimizer, scheduler, batch, None, None), runs=1)
    est = estimate_peak(cfg, model.args, prompt_tokens=base.prompt, device_type=DEVICE.type)
    return out | {"predicted_gib": update_peak(est) / GiB}


def probe_rollout(model, base: Case, tc: int) -> dict[str, Any]:
    """The rollout of `base.group` completions of `tc` tokens, with the optimizer state a training
    run holds by then (one zero-gradient step creates it)."""
    case = probe_case(base, tc, group=base.group)
    cfg = make_cfg(case, checkpointing=True, offload=True)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sampler = ProbeSampler(model, _NoText(), cuda_graphs=False)
    params = SamplingParams(n=base.group, max_new_tokens=tc, ignore_stop=True)
    prompt = torch.randint(10, model.args.vocab_size - 10, (base.prompt,)).tolist()
    out = measure(lambda: sampler.generate([prompt], params), runs=1)
    est = estimate_peak(cfg, model.args, prompt_tokens=base.prompt, device_type=DEVICE.type)
    return out | {"predicted_gib": est.phases["rollout"] / GiB, "kv_cache_gib": est.parts["kv_cache"] / GiB}


def longest_completion(base: Case, dtype: torch.dtype, budget_s: int, max_len: int) -> dict[str, Any]:
    """Longest completion for which one GRPO step with `base.group` generations fits on this device.

    Two bounds: the rollout (the KV cache of G concurrent completions grows G times faster with the
    length than the update's one-completion micro-batch) and the update. The pre-flight predicts
    both; both are measured at the smaller prediction, stepping down by 1/16 on an OOM. Then, budget
    allowing, the update alone at its own predicted limit: the bound left for a sampler that holds
    fewer completions at once. One model serves every probe.
    """
    from minigrpo.models.args import ModelArgs

    free = torch.cuda.mem_get_info()[0] if DEVICE.type == "cuda" else 8 * GiB
    if MEMORY_CAP is not None:  # the caching allocator refuses to grow past the cap (an OOM, as on a smaller GPU)
        free = min(free, MEMORY_CAP)
    hf = arch_config(base.arch)
    margs = ModelArgs.from_hf_config(hf)

    def predicted_longest(phase: str, group: int) -> int:
        def peak(tc: int) -> int:
            cfg = make_cfg(probe_case(base, tc, group), checkpointing=True, offload=True)
            est = estimate_peak(cfg, margs, prompt_tokens=base.prompt)
            return est.phases["rollout"] if phase == "rollout" else update_peak(est)

        lo, hi = 0, max_len
        while hi - lo > 64:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if peak(mid) < free else (lo, mid)
        return lo

    p_rollout, p_update = predicted_longest("rollout", base.group), predicted_longest("update", 2)
    start = time.perf_counter()
    model, _ = build_model(base, dtype)
    attach_adapters(model, make_cfg(base, checkpointing=True, offload=True))
    model.gradient_checkpointing = model.activation_offload = True
    trials: list[dict[str, Any]] = []

    def probe(phase: str, tc: int) -> bool:
        left = int(budget_s - (time.perf_counter() - start))
        row: dict[str, Any] = {"phase": phase, "completion": tc}
        if left < 20:
            return False
        try:
            with time_limit(left):
                row |= (
                    probe_rollout(model, base, tc)
                    if phase == "rollout"
                    else probe_update(model, base, tc, hf["vocab_size"])
                )
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except CaseTimeout as e:
            row["status"] = f"timeout ({e})"
        finally:
            model.zero_grad(set_to_none=True)
            gc.collect()
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
        print(row, flush=True)
        trials.append(row)
        return row["status"] == "ok"

    step, longest = min(p_rollout, p_update) // 256 * 256, 0
    while step >= 256:
        if probe("rollout", step) and probe("update", step):
            longest = step
            break
        if trials[-1]["status"] != "OOM":
            break
        step = step * 15 // 16 // 256 * 256
    update_alone = None
    if p_update > longest:
        tc = p_update // 256 * 256
        while tc > longest:
            if probe("update", tc):
                update_alone = tc
                break
            if trials[-1]["status"] != "OOM":
                break
            tc = tc * 15 // 16 // 256 * 256
    return {
        "arch": base.arch,
        "quantize": base.quantize,
        "generations": base.group,
        "free_gib": free / GiB,
        "longest_step_completion": longest,
        "bound": "rollout" if p_rollout <= p_update else "update",
        "predicted_rollout_longest": p_rollout,
        "predicted_update_longest": p_update,
        "update_alone_fits": update_alone,
        "trials": trials,
    }


# ================================================================================================


def earlier_result(name: str, env: dict[str, Any], out_dir: str | None = None) -> dict[str, Any]:
    path = (RESULTS if out_dir is None else Path(out_dir)) / f"{name}_{device_slug(env)}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def merged(payload: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """This run's rows plus the earlier run's rows of (case, provider) pairs not measured now, so
    that runs of a few cases each (one device session is short) add up to one results file; kept
    rows say so. The bisection likewise, when this run skipped it."""
    done = {(r["case"], r["provider"]) for r in payload["rows"]}
    kept = [r | {"from_earlier_run": True} for r in earlier.get("rows", []) if (r["case"], r["provider"]) not in done]
    out = dict(payload, rows=payload["rows"] + kept)
    if not payload["bisect"] and earlier.get("bisect"):
        out["bisect"] = earlier["bisect"] | {"from_earlier_run": True}
    return out


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small architecture and lengths (a smoke run)")
    case_names = [c.name for c in (*FULL_CASES, *QUICK_CASES)]
    ap.add_argument("--cases", type=names(case_names), default=None, help="comma-separated case names (default: all)")
    ap.add_argument(
        "--providers", type=names(Case.providers), default=None, help="a subset of ours,naive,trl,trl_liger"
    )
    ap.add_argument("--no-bisect", action="store_true", help="skip the longest-completion search")
    ap.add_argument("--bisect-budget-s", type=positive_int, default=900)
    ap.add_argument("--out-dir", type=out_folder, default=None, help="write the JSON here, not in benchmarks/results")
    ap.add_argument(
        "--memory-gib", type=positive_float, default=None, help="cap the device at this much (e.g. 80 on an H200)"
    )
    args = ap.parse_args()
    if args.memory_gib and DEVICE.type == "cuda":
        global MEMORY_CAP
        MEMORY_CAP = int(args.memory_gib * GiB)
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, MEMORY_CAP / torch.cuda.get_device_properties(0).total_memory)
        )
    env = environment()
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.cases:
        other = [name for name in args.cases if name not in {c.name for c in cases}]
        if other:
            ap.error(
                f"--cases: {', '.join(other)}: {'not a --quick case' if args.quick else 'a --quick case (add --quick)'}"
            )
        cases = [c for c in cases if c.name in args.cases]
    providers = set(args.providers) if args.providers else None
    payload: dict[str, Any] = {"environment": env, "quick": args.quick, "memory_cap_gib": args.memory_gib}
    payload.update(rows=[], bisect={})
    name = "memory_quick" if args.quick else "memory"
    earlier = earlier_result(name, env, args.out_dir)
    for case in cases:
        for provider in case.providers:
            if providers is None or provider in providers:
                payload["rows"].append(run_case(case, provider, dtype))
                write_result(name, merged(payload, earlier), args.out_dir)  # a run cut short keeps its rows
    if not args.no_bisect:
        base = QUICK_CASES[1] if args.quick else FULL_CASES[-1]
        if args.quick:
            bisect = longest_completion(base, dtype, min(60, args.bisect_budget_s), max_len=2048)
        else:
            bisect = longest_completion(base, dtype, args.bisect_budget_s, max_len=262144)
        print("longest completion that fits:", {k: v for k, v in bisect.items() if k != "trials"}, flush=True)
        payload["bisect"] = bisect
    path = write_result(name, merged(payload, earlier), args.out_dir)
    rows = payload["rows"]
    print(f"\n{env['device']}, torch {env['torch']} -> {path.name}")
    cols = ["case", "provider", "micro_batch", "status", "peak_alloc_gib", "peak_reserved_gib", "predicted_gib"]
    print_table(rows, [*cols, "tokens_per_s"])


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument is one `error:` line
