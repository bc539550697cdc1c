"""One GRPO update, ours vs TRL 1.16's GRPOTrainer, on the same fixed batch: is it the same update?

    python benchmarks/e2e_parity.py [--quick] [--model tiny|smollm2] [--ties tied,untied]
                                    [--temperature 1.0] [--max-grad-norm 1.0] [--out-dir DIR]

Why: bench_e2e.py --mode learn shows TRL learning faster than ours on configs/smollm2_arith_gpu.yaml.
Before blaming precision or sampling noise, this checks that both compute the same update for the
same batch, on CPU in fp32 where the only differences left are definitional (or bugs).

What it does, per LM-head tying (SmolLM2 ties it):
  1. an HF folder both sides load: a 2-layer random Llama with SmolLM2's tokenizer (--model tiny), or
     the packaged SmolLM2-135M-Instruct in fp32 (--model smollm2; tied only);
  2. one batch: B arithmetic prompts (our chat rendering) x G random completions of varying lengths,
     some ending in EOS, some truncated at Tc, right padded; rewards with spread (one group flat);
     advantages from minigrpo.advantages.group_advantages (scale "group"), checked against TRL's formula;
  3. ours: minigrpo.step.update_phase (fused LM head + dapo, micro-batches as train.micro_batch_size)
     with build_optimizer/build_scheduler and its clipping -> loss, pre-clip grad norm, grads, update;
  4. TRL: AutoModelForCausalLM (fp32) in a GRPOTrainer built with bench_e2e's config mapping and the
     same AdamW + LambdaLR; `_generate_and_score_completions` is replaced by one returning this batch
     as TRL builds it (prompt/completion ids and masks, advantages, num_items_in_batch), then
     `trainer.train()` runs one real step: TRL's shuffle and split into micro-batches, its loss, the
     Trainer's accumulation, clipping and optimizer step;
  5. compare: log-probs and entropies before the step, loss, grad norm, per-parameter cosine and
     relative L2 difference of the (clipped) gradients the optimizer saw and of the parameter updates.
Also recorded: whether our prompt ids equal TRL's `_tokenize_prompts`, the stop ids and TRL's
generation config (what the rollouts of the two would differ in).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from bench_e2e import trl_config_kwargs, trl_optimizers, unshadow_hf_kernels
from common import environment, names, out_folder, positive_float, print_table, write_result

from minigrpo import advantages as adv
from minigrpo.config import load_config
from minigrpo.data import build_messages, encode_prompts, synthetic_arithmetic
from minigrpo.errors import ArgumentParser, run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_arith_gpu.yaml"


def write_model(folder: Path, model: str, tied: bool) -> Path:
    """An HF checkpoint folder (config, fp32 safetensors, SmolLM2 tokenizer) both sides load."""
    from minigrpo.models.loading import build_random, load_pretrained, save_pretrained
    from minigrpo.models.presets import preset_config

    smol, tokenizer = load_pretrained("smollm2", dtype=torch.float32)
    if model == "tiny":
        ids = {k: smol.args.hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = {**preset_config("tiny-llama"), **ids, "vocab_size": smol.args.vocab_size}
        smol = build_random({**config, "tie_word_embeddings": tied}, dtype=torch.float32, seed=0)
    return save_pretrained(smol, tokenizer, folder, dtype=torch.float32)


def make_batch(tokenizer, B: int, G: int, Tc: int, seed: int) -> dict:
    """B prompts x G completions: left-padded prompts, right-padded random completions (lengths 1..Tc,
    EOS-terminated below Tc, half of the full-length ones truncated), rewards in {0, .5, 1, 2}."""
    gen = torch.Generator().manual_seed(seed)
    examples = synthetic_arithmetic(seed, B)
    ids, _ = encode_prompts(examples, tokenizer)
    Tp, N, eos, pad = max(map(len, ids)), B * G, tokenizer.stop_ids[0], tokenizer.pad_token_id
    prompt_ids = torch.full((N, Tp), pad, dtype=torch.long)
    prompt_mask = torch.zeros(N, Tp, dtype=torch.long)
    for i in range(N):
        p = ids[i // G]
        prompt_ids[i, Tp - len(p) :], prompt_mask[i, Tp - len(p) :] = torch.tensor(p), 1
    lengths = torch.randint(1, Tc + 1, (N,), generator=gen)
    lengths[0], lengths[1] = Tc, Tc  # at least one truncated and one full-length EOS row
    completion_ids = torch.randint(100, 10_000, (N, Tc), generator=gen)  # (N, Tc) ordinary tokens
    completion_mask = (torch.arange(Tc)[None, :] < lengths[:, None]).long()
    truncated = (lengths == Tc) & (torch.arange(N) % 2 == 0)
    completion_ids[torch.arange(N), lengths - 1] = torch.where(truncated, completion_ids[:, -1], eos)
    completion_ids[completion_mask == 0] = pad
    rewards = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (N,), generator=gen)]
    rewards[-G:] = 1.0  # a flat group: zero advantage
    # fmt: off
    return dict(examples=examples, prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, truncated=truncated, rewards=rewards,
                advantages=adv.group_advantages(rewards, G, scale="group"))
    # fmt: on


def trl_advantages(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """TRL's advantages (sum_then_normalize, scale_rewards 'group'), through its own nanstd."""
    unshadow_hf_kernels()  # TRL imports the Hugging Face `kernels` package
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(G)
    std = nanstd(grouped, dim=1).repeat_interleave(G)
    return (rewards - mean) / (std + 1e-4)


def grad_recorder(optimizer, named: dict[str, torch.nn.Parameter], into: dict) -> None:
    """Copy every gradient as the optimizer step sees it (after clipping) into `into`, by name."""
    by_id = {id(p): n for n, p in named.items()}

    def hook(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    into[by_id[id(p)]] = p.grad.detach().clone()

    optimizer.register_step_pre_hook(hook)


def run_ours(cfg, folder: Path, batch: dict) -> dict:
    from minigrpo.logprobs import completion_logprobs
    from minigrpo.models.loading import load_pretrained
    from minigrpo.optim import build_optimizer, build_scheduler
    from minigrpo.sampling.rollout import Rollout
    from minigrpo.step import Batch, update_phase

    model, _ = load_pretrained(folder, dtype=torch.float32)
    named = dict(model.named_parameters())
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, cfg.train.steps)
    grads: dict[str, torch.Tensor] = {}
    grad_recorder(optimizer, named, grads)
    b, N = batch, len(batch["rewards"])
    ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    attn = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
    with torch.no_grad():
        logp, entropy = completion_logprobs(
            model, ids, attn, b["completion_mask"], temperature=cfg.sampler.temperature, return_entropy=True
        )
    tensors = {k: b[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated")}
    G = cfg.grpo.group_size
    sampler_logp, texts, index = torch.zeros(b["completion_ids"].shape), [""] * N, torch.arange(N) // G
    rollout = Rollout(**tensors, sampler_logp=sampler_logp, completion_texts=texts, prompt_index=index, group_size=G)
    before = {n: p.detach().clone() for n, p in named.items()}
    step = Batch(rollout, b["rewards"], b["advantages"], {}, [""] * N, [""] * N)
    stats = update_phase(cfg, model, optimizer, scheduler, step, None, None)
    delta = {n: p.detach() - before[n] for n, p in named.items()}
    return dict(loss=stats["loss"], grad_norm=stats["grad_norm"], grads=grads, delta=delta, logp=logp, entropy=entropy)


def run_trl(cfg, folder: Path, batch: dict, out: dict, padding_idx: bool = True) -> dict:
    """One real GRPOTrainer step on the batch; `out` also gets TRL's rollout settings. padding_idx False:
    drop the embedding's padding_idx (transformers sets config.pad_token_id: that row gets no input gradient)."""
    unshadow_hf_kernels()
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    named = dict(model.named_parameters())  # a tied head is listed once, as model.embed_tokens.weight
    if not padding_idx:
        model.get_input_embeddings().padding_idx = None
    out["hf_padding_idx"] = model.get_input_embeddings().padding_idx  # what TRL's step ran with
    optimizer, scheduler = trl_optimizers(model, cfg)  # bench_e2e's: the same settings as ours
    grads: dict[str, torch.Tensor] = {}
    grad_recorder(optimizer, named, grads)
    b = batch
    messages = [build_messages(ex) for ex in b["examples"]]
    data = datasets.Dataset.from_list([{"prompt": m} for m in messages])
    with tempfile.TemporaryDirectory(prefix="e2e-parity-trl-") as tmp:
        kwargs = trl_config_kwargs(cfg, "trl", 1, tmp)
        kwargs = {k: v for k, v in kwargs.items() if k in GRPOConfig.__dataclass_fields__}
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
            args=GRPOConfig(**kwargs),
            train_dataset=data,
            processing_class=transformers.AutoTokenizer.from_pretrained(folder),
            optimizers=(optimizer, scheduler),
        )
        out["trl_prompt_ids"] = [list(p) for p in trainer._tokenize_prompts(messages)[0]]
        out["trl_eos_token_ids"] = list(trainer.eos_token_ids)
        gen = trainer.generation_config.to_diff_dict()
        out["trl_generation"] = {k: gen.get(k) for k in ("temperature", "top_p", "top_k", "min_p", "max_new_tokens")}
        mask = b["completion_mask"]
        inputs = {k: b[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")}
        inputs["num_items_in_batch"] = mask.sum()  # what TRL gathers over the generation batch
        trainer._generate_and_score_completions = lambda _: dict(inputs)
        ids, attn = torch.cat([b["prompt_ids"], b["completion_ids"]], 1), torch.cat([b["prompt_mask"], mask], 1)
        with torch.no_grad():
            logp, entropy, _ = trainer._get_per_token_logps_and_entropies(
                model, ids, attn, mask.shape[1], compute_entropy=True
            )
        before = {n: p.detach().clone() for n, p in named.items()}
        trainer.train()
    delta = {n: p.detach() - before[n] for n, p in named.items()}
    log = trainer.state.log_history[0]  # the step's summed micro-batch losses and pre-clip norm
    return dict(loss=log["loss"], grad_norm=log["grad_norm"], grads=grads, delta=delta, logp=logp, entropy=entropy)


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[dict]:
    """Per parameter (ours `a` vs TRL `b`): cosine, ||a - b|| / ||b||, both norms."""
    rows = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            rows.append({"param": name, "missing": "ours" if name not in a else "trl"})
            continue
        x, y = a[name].double().flatten(), b[name].double().flatten()
        cos = float(torch.nn.functional.cosine_similarity(x, y, dim=0)) if x.norm() and y.norm() else float("nan")
        rel = float((x - y).norm() / y.norm()) if y.norm() else float((x - y).norm())
        flips = float(((x > 0) != (y > 0)).double().mean())  # Adam's first step is ~ lr * sign(g)
        rows.append(
            {"param": name, "cos": cos, "rel_diff": rel, "sign_flips": flips, "norm_ours": float(x.norm()),
             "norm_trl": float(y.norm())}
        )  # fmt: skip
    return rows


def overall(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    keys = sorted(set(a) & set(b))
    x, y = (torch.cat([d[k].double().flatten() for k in keys]) for d in (a, b))
    cos = float(torch.nn.functional.cosine_similarity(x, y, dim=0))
    return {"cos": cos, "rel_diff": float((x - y).norm() / y.norm()), "sign_flips": int(((x > 0) != (y > 0)).sum())}


def one_case(args, tied: bool, root: Path) -> dict:
    from minigrpo.models.tokenizer_files import load_tokenizer_folder

    B, G, Tc, micro = (2, 4, 6, 4) if args.quick else (4, 4, 12, 8)
    # fmt: off
    cfg = load_config(CONFIG, [
        "run.device=cpu", "run.dtype=float32", f"grpo.prompts_per_step={B}", f"grpo.group_size={G}",
        f"train.micro_batch_size={micro}", f"sampler.max_new_tokens={Tc}", f"sampler.temperature={args.temperature}",
        f"train.max_grad_norm={args.max_grad_norm}", "train.steps=1",
    ])
    # fmt: on
    folder = write_model(root / f"{args.model}-{'tied' if tied else 'untied'}", args.model, tied)
    batch = make_batch(load_tokenizer_folder(folder), B, G, Tc, args.seed)
    case: dict = {"model": args.model, "tied": tied, "B": B, "G": G, "Tc": Tc, "micro_batch": micro}
    case["advantage_max_diff"] = float((batch["advantages"] - trl_advantages(batch["rewards"], G)).abs().max())
    ours = run_ours(cfg, folder, batch)
    trl = run_trl(cfg, folder, batch, case, padding_idx=args.hf_padding_idx == "keep")
    ours_ids, _ = encode_prompts(batch["examples"], load_tokenizer_folder(folder))
    case["prompt_ids_equal"] = ours_ids == case.pop("trl_prompt_ids")
    case["our_stop_ids"] = list(load_tokenizer_folder(folder).stop_ids)
    m = batch["completion_mask"].bool()
    case["logp_max_diff"] = float((ours["logp"] - trl["logp"])[m].abs().max())
    case["entropy_max_diff"] = float((ours["entropy"] - trl["entropy"])[m].abs().max())
    case |= {"loss_ours": ours["loss"], "loss_trl": trl["loss"], "grad_norm_ours": ours["grad_norm"]}
    case["loss_rel_diff"] = abs(ours["loss"] - trl["loss"]) / abs(trl["loss"])
    case |= {"grad_norm_trl": trl["grad_norm"], "grad_norm_ratio": ours["grad_norm"] / trl["grad_norm"]}
    grads, deltas = (ours["grads"], trl["grads"]), (ours["delta"], trl["delta"])
    case["grads"], case["updates"] = overall(*grads), overall(*deltas)
    case["per_param_grads"], case["per_param_updates"] = compare(*grads), compare(*deltas)
    return case


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 prompts x 4 completions, 6 tokens, micro-batch 4")
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--ties", type=names(("tied", "untied")), default=None, help="tied,untied (smollm2: tied)")
    ap.add_argument("--temperature", type=positive_float, default=1.0, help="sampler.temperature (both divide by it)")
    ap.add_argument(
        "--hf-padding-idx", choices=("keep", "none"), default="keep",
        help="none: clear transformers' nn.Embedding padding_idx (= config.pad_token_id) on TRL's model",
    )  # fmt: skip
    ap.add_argument("--max-grad-norm", type=positive_float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=out_folder, default=None, help="instead of benchmarks/results")
    args = ap.parse_args()
    ties = ["tied"] if args.model == "smollm2" else (args.ties or ["tied", "untied"])
    with tempfile.TemporaryDirectory(prefix="e2e-parity-") as tmp:
        cases = [one_case(args, tie == "tied", Path(tmp)) for tie in ties]
    worst = []
    for c in cases:
        for kind in ("grads", "updates"):
            ranked = sorted((r for r in c[f"per_param_{kind}"] if "rel_diff" in r), key=lambda r: -r["rel_diff"])
            worst += [{"tied": c["tied"], "of": kind, **r} for r in ranked[:3]]
    cols = [
        "tied",
        "hf_padding_idx",
        "logp_max_diff",
        "entropy_max_diff",
        "loss_ours",
        "loss_rel_diff",
        "grad_norm_ours",
    ]
    print_table(cases, [*cols, "grad_norm_trl", "grad_norm_ratio", "advantage_max_diff", "prompt_ids_equal"])
    rows = [{"tied": c["tied"], "of": k, **c[k]} for c in cases for k in ("grads", "updates")]
    print_table(rows, ["tied", "of", "cos", "rel_diff", "sign_flips"])
    print("\nlargest per-parameter differences:")
    print_table(worst, ["tied", "of", "param", "cos", "rel_diff", "sign_flips", "norm_ours", "norm_trl"])
    for c in cases:
        print(f"tied={c['tied']}: stop ids ours {c['our_stop_ids']}, TRL {c['trl_eos_token_ids']}")
        print(f"  TRL's generation config: {c['trl_generation']}")
    payload = {"environment": environment(), "args": vars(args), "how": __doc__, "cases": cases}
    tag = f"e2e_parity_{args.model}_t{args.temperature:g}_pad-{args.hf_padding_idx}"
    print(f"\nwrote {write_result(tag, payload, out_dir=args.out_dir)}")


if __name__ == "__main__":
    run_cli(lambda _: main())
