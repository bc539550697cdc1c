"""Evaluate a model on a held-out split: `python -m minigrpo.eval --checkpoint DIR [options]`.

    python -m minigrpo.eval --checkpoint runs/demo_cpu/checkpoints/step_000020 --split train --num 100
    python -m minigrpo.eval --checkpoint smollm2 --config configs/smollm2_arith_gpu.yaml --num 100

Accuracy is the fraction of completions whose extracted final answer (answer tag, \\boxed{},
`####` or the last number) equals the reference; the configured reward functions are reported too.
Sampling follows `eval.temperature` (greedy by default; above 0 an example's draw depends on run.seed
and its index only, not on --batch-size) and `eval.max_new_tokens`. With k = `eval.samples_per_prompt`
(`--samples-per-prompt`) > 1 completions per example, accuracy is their mean (pass@1 estimated over k)
and pass@k (any of the k right) and maj@k (the most frequent answer right) are reported beside it.
`--num N` scores exactly the first N examples of the split (above data.num_eval if asked; an error if
the split holds fewer); `--output` writes the results as strict JSON (null for a mean over no score).
With `env.kind` set, every example is an episode played as in training (minigrpo/episodes.py: env.max_turns turns
of at most eval.max_new_tokens tokens, env.max_episode_tokens in all): the answer is read from the
model's last turn, the rewards see the episode columns, and the env/* metrics of training are
reported too (turns, tool calls and failures, how episodes ended, prefilled tokens). Without
`--config`, the run config saved in a training checkpoint (`run_config.yaml`) is used, or the run's
config.yaml for its final model (run_dir/merged, an SFT run's run_dir/model); a LoRA checkpoint (a
PEFT adapter) is applied to the base model that config names, or without one to the base its
adapter_config.json names. A run folder (run_dir, or run_dir/checkpoints) stands for its newest intact
checkpoint, else its final model (merged, model), picked again when a run still training deletes it
meanwhile (checkpoint.keep_last); the folder evaluated is printed and saved as "checkpoint". The
split is the config's `data.eval_split` unless `--split` names one of its splits; every argument is
checked before any weights load: the prompts against the model's positions (a folder's config.json,
a GGUF file's header; a hub model's once fetched) and, on CUDA, a memory pre-flight of one batch's
KV cache and sampling buffers (minigrpo/eval_memory.py), which names the --batch-size or setting
that would fit. Ctrl-C is one `interrupted` line (exit status 130).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from minigrpo import lora, rewards
from minigrpo.atomic import missing_folder_error, write_atomic
from minigrpo.build import check_dtype, compute_dtype, load_policy, pick_device, sampling_params
from minigrpo.checkpoint import CheckpointError, check_writable
from minigrpo.config import Config, add_overrides_argument, load_config
from minigrpo.data import Example, batch_columns, build_dataset, build_messages, encode_prompts
from minigrpo.distributed import World, env_world_size
from minigrpo.env_config import build_environment, check_chat_template, check_environment
from minigrpo.episodes import Episode, episode_columns, run_episodes
from minigrpo.errors import ArgumentParser, UserError, path_arg, read_vanishing, run_cli
from minigrpo.eval_memory import eval_preflight
from minigrpo.loop_columns import data_source, refuse_loop_columns
from minigrpo.lora_export import AdapterError, adapter_base, check_adapter_fits, check_peft_adapter
from minigrpo.models.args import ModelArgs
from minigrpo.models.loading import PACKAGED_MODELS, check_model_source, load_pretrained
from minigrpo.prompt_fit import position_limit, prompts_that_fit
from minigrpo.reward_fns import set_run_device
from minigrpo.run_folder import RUN_OUTPUTS, run_folder_pick
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.step import episode_metrics

# eval.temperature > 0 samples from the noise stream (run.seed, EVAL_STREAM, turn) with the example's
# index as its row id: an example draws the same completion whatever --batch-size (training: (seed, step, round))
EVAL_STREAM = -2


@torch.no_grad()
def evaluate(
    cfg: Config,
    model,
    tokenizer,
    examples: list[Example],
    *,
    batch_size: int = 32,
    specs: list[rewards.RewardSpec] | None = None,
) -> dict[str, Any]:
    """Greedy (or eval.temperature) completions, or episodes with env.kind, k = eval.samples_per_prompt
    per example -> accuracy (over all completions) and mean rewards (specs: the config's reward
    functions, built from cfg.rewards unless given), pass@k and maj@k when k > 1, and the env/*
    metrics of the episodes."""
    sampler = KVCacheSampler(model, tokenizer, cuda_graphs=cfg.sampler.compile, max_rows=cfg.sampler.max_rows)
    key, k = (cfg.run.seed, EVAL_STREAM), cfg.eval.samples_per_prompt
    params = sampling_params(
        cfg, tokenizer, n=k, temperature=cfg.eval.temperature, max_new_tokens=cfg.eval.max_new_tokens
    )
    specs = rewards.build_reward_specs(cfg.rewards) if specs is None else specs
    env = build_environment(cfg, tokenizer)
    correct, answers_given, totals, per_fn, samples = [], [], [], {s.name: [] for s in specs}, []
    episodes: list[Episode] = []
    turn_stats = {"prefill_tokens": 0.0, "reused_tokens": 0.0}  # summed over the batches' episodes
    t0 = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        rows = [ex for ex in batch for _ in range(k)]  # the k samples of an example are adjacent
        row_ids = range(start * k, (start + len(batch)) * k)  # an example's draws do not depend on --batch-size
        answers = [ex.answer for ex in rows]
        columns = batch_columns(batch, repeat=k)
        if env is None:
            ids, _ = encode_prompts(batch, tokenizer, cfg.data.system_prompt, cfg.data.chat_template_kwargs)
            rollout = sampler.generate(ids, params, key=(*key, 0), row_ids=row_ids)
            texts, longest = rollout.completion_texts, params.max_new_tokens
            lengths = rollout.completion_lengths.tolist()
            columns["prompt_messages"] = [build_messages(ex, cfg.data.system_prompt) for ex in rows]  # as training
        else:  # the answer is in the model's last turn; the rewards read the whole episode
            stats: dict[str, float] = {}
            played = run_episodes(
                sampler, tokenizer, env, batch, params, max_turns=cfg.env.max_turns, key=key,
                max_episode_tokens=cfg.env.max_episode_tokens, row_ids=row_ids, stats=stats,
            )  # fmt: skip
            turn_stats = {name: v + stats[name] for name, v in turn_stats.items()}
            columns.update(episode_columns(played))
            episodes += played
            texts, longest = columns["final_response"], cfg.env.max_episode_tokens
            lengths = [e.num_tokens for e in played]  # as longest: the episode's model + tool tokens
        columns.update(completion_lengths=lengths, max_completion_length=[longest] * len(rows))
        scored = rewards.score([ex.prompt for ex in rows], texts, answers, specs, columns=columns)
        for i, text in enumerate(texts):
            given = rewards.extract_answer(text)
            ok = rewards.answers_match(given, answers[i])
            correct.append(ok)
            answers_given.append(given)
            totals.append(float(scored.total[i]))
            for j, name in enumerate(scored.names):
                per_fn[name].append(float(scored.per_fn[i, j]))
            if len(samples) < 5:
                sample = {"prompt": rows[i].prompt, "completion": text, "answer": answers[i], "correct": ok}
                if env is not None:  # the whole episode: every message, tool results included
                    sample["messages"] = columns["messages"][i]
                samples.append(sample)

    def mean(xs: list[float]) -> float:
        valid = [x for x in xs if x == x]  # NaN: no score
        return sum(valid) / len(valid) if valid else float("nan")

    env_metrics = {}
    if env is not None:
        env_metrics = episode_metrics(World(), episodes, torch.tensor(totals), turn_stats)
    return {
        "num_examples": len(examples),
        "accuracy": sum(correct) / max(len(correct), 1),
        **(sample_metrics(correct, answers_given, [ex.answer for ex in examples], k) if k > 1 else {}),
        "reward": mean(totals),
        **{f"reward/{name}": mean(v) for name, v in per_fn.items()},
        **env_metrics,
        "seconds": time.perf_counter() - t0,
        "samples": samples,
    }


def sample_metrics(correct: list[bool], given: list[str | None], references: list[str], k: int) -> dict[str, float]:
    """pass@k: the share of examples with at least one of their k completions right; maj@k: the share
    whose most frequent answer is right (answers equal as answers_match reads them; a completion
    without an answer does not vote; a tie goes to the answer given first). `correct` and `given`
    hold k entries per example, an example's adjacent."""
    passed, majority = 0, 0
    for e, reference in enumerate(references):
        passed += any(correct[e * k : (e + 1) * k])
        votes: list[list] = []  # [answer, count], in the order first given
        for answer in (a for a in given[e * k : (e + 1) * k] if a is not None):  # no answer: no vote
            vote = next((v for v in votes if rewards.answers_match(answer, v[0])), None)
            if vote is None:
                votes.append([answer, 1])
            else:
                vote[1] += 1
        if votes:
            winner = max(votes, key=lambda v: v[1])  # max keeps the first of equal counts
            majority += rewards.answers_match(winner[0], reference)
    n = max(len(references), 1)
    return {f"pass@{k}": passed / n, f"maj@{k}": majority / n}


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="minigrpo.eval", description="Evaluate a checkpoint on a held-out split")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder, run folder (its newest intact checkpoint), hub id, .gguf file or 'smollm2'",
    )
    parser.add_argument("--config", default=None, help="YAML config (default: the run's config saved with it)")
    add_overrides_argument(parser, "eval.temperature=0.7 eval.max_new_tokens=512")
    parser.add_argument("--split", default=None, help="data.split or data.eval_split (default: data.eval_split)")
    parser.add_argument("--num", type=int, default=None, help="number of examples (default: eval.num_prompts)")
    parser.add_argument(
        "--samples-per-prompt",
        type=int,
        default=None,
        help="completions per prompt, k (eval.samples_per_prompt; needs eval.temperature > 0): pass@k and maj@k",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="prompts generated at once")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.checkpoint, args.output = path_arg(args.checkpoint, "--checkpoint"), path_arg(args.output, "--output")
    k = args.samples_per_prompt
    for flag, value in (("--num", args.num), ("--batch-size", args.batch_size), ("--samples-per-prompt", k)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if k is not None:  # a config value like any other: checked with the rest of the config
        args.overrides.append(f"eval.samples_per_prompt={k}")
    return args


def run_config_of(checkpoint: Path, config: str | None) -> str | None:
    """The config to evaluate with: --config, else the one a run saved with this folder:
    run_dir/checkpoints/step_N/run_config.yaml, or run_dir/config.yaml for a run's final model
    (run_dir/merged of a LoRA run, run_dir/model of an SFT run: its data.synthetic is the task); for a
    GGUF file the export wrote beside such a folder (`step_N.q8_0.gguf`), that folder's."""
    if config is not None:
        return config
    if checkpoint.is_file() and checkpoint.name.lower().endswith(".gguf"):  # export's <folder>.<type>.gguf, any case
        folder = checkpoint.name[: -len(".gguf")].rpartition(".")[0]
        return run_config_of(checkpoint.with_name(folder), None) if folder else None
    if not checkpoint.is_dir():
        return None
    folder = checkpoint.resolve()
    candidates = [folder / "run_config.yaml"]
    if folder.name in RUN_OUTPUTS and (folder.parent / "metrics.jsonl").is_file():  # inside a run's folder
        candidates.append(folder.parent / "config.yaml")
    return next((str(p) for p in candidates if p.is_file()), None)


def take_adapter_base(cfg: Config, checkpoint: Path, adapter: dict[str, Any], overrides: list[str]) -> None:
    """A LoRA checkpoint without a config (no --config, no run_config.yaml: a bare PEFT adapter) is
    evaluated on the base model its adapter_config.json names, as the export merges it, not on the
    default config's model; `--set model.name_or_path=...` still picks another base."""
    named = {item.partition("=")[0].strip() for item in overrides}  # the keys --set gives
    if named & {"model.name_or_path", "model.arch"}:
        return
    base, revision = adapter_base(checkpoint, adapter)  # a packaged base: its own name, not the hub original
    if not isinstance(base, str) or not base:
        raise UserError(
            f"{checkpoint / 'adapter_config.json'} names no base model (base_model_name_or_path): pass the "
            "run's --config, or --set model.name_or_path=<base model>"
        )
    cfg.model.name_or_path = base
    if "model.revision" not in named:
        cfg.model.revision = revision


def take_adapter_shape(cfg: Config, adapter: dict[str, Any], where: Path | str = "adapter_config.json") -> None:
    """The adapters evaluated are the checkpoint's: rank, alpha, rsLoRA and the adapted layers come
    from its adapter_config.json (`where`), so a --config or --set with another lora.r or lora.targets
    evaluates the trained adapter instead of failing once the base has loaded, and the memory
    pre-flight counts the adapter that loads. Taken with LoRA off too (a bare adapter on the default
    config): the adapter is then added to the base as it loads, and merged."""
    cfg.lora.r, cfg.lora.alpha = int(adapter["r"]), float(adapter["lora_alpha"])
    cfg.lora.rslora = bool(adapter.get("use_rslora", False))
    targets = adapter_targets(adapter.get("target_modules"), where)
    if targets is not None:
        cfg.lora.targets = targets


def adapter_targets(modules: Any, where: Path | str = "adapter_config.json") -> list[str] | None:
    """lora.targets for a PEFT target_modules (None when it has none: the config's targets stand).

    A list names modules as PEFT matches them, by their last name (`q_proj`, `self_attn.q_proj` and
    `model.layers.0.self_attn.q_proj` all name q; Phi-3's fused `qkv_proj` names q, k and v, as
    lora.TARGETS maps them); "all-linear" is every target; another string is a regular expression
    PEFT matches against whole module names, taken for a target when it matches that target's module
    in any block. A name no target has is an AdapterError naming the file and the name."""
    if modules is None:
        return None
    if modules == "all-linear":
        return list(lora.TARGETS)
    by_path = _targets_by_module_path()  # "self_attn.qkv_proj" -> ["q", "k", "v"]
    if isinstance(modules, str):
        pattern = _adapter_pattern(modules, where)
        paths = [p for p in by_path if any(pattern.fullmatch(f"model.layers.{i}.{p}") for i in range(_MAX_BLOCKS))]
        if not paths:
            raise AdapterError(f"{where}: target_modules={modules!r} matches none of the layers LoRA adapts")
    elif isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules):
        by_name = {path.rpartition(".")[2]: path for path in by_path}
        unknown = [m for m in modules if m.rpartition(".")[2] not in by_name]
        if unknown:
            raise AdapterError(
                f"{where}: target_modules names {unknown[0]!r}, not a layer LoRA adapts here ({', '.join(by_name)})"
            )
        paths = [by_name[m.rpartition(".")[2]] for m in modules]
    else:
        raise AdapterError(f"{where}: target_modules={modules!r} must be a list of module names or a pattern")
    chosen = {target for path in paths for target in by_path[path]}
    return [target for target in lora.TARGETS if target in chosen]  # in lora.TARGETS' order


_MAX_BLOCKS = 1024  # block indices a target_modules pattern is tried on (more than any model has)


def _targets_by_module_path() -> dict[str, list[str]]:
    """Module path inside a block -> the config targets it adapts (lora.TARGETS read backwards)."""
    out: dict[str, list[str]] = {}
    for target, paths in lora.TARGETS.items():
        for path in dict.fromkeys(paths):
            out.setdefault(path, []).append(target)
    return out


def _adapter_pattern(modules: str, where: Path | str) -> re.Pattern[str]:
    """target_modules given as a regular expression, compiled; a broken one is an AdapterError."""
    try:
        return re.compile(modules)
    except re.error as e:
        raise AdapterError(f"{where}: target_modules={modules!r} is not a regular expression ({e})") from None


def check_output(output: str | None) -> None:
    """--output names a file that can be written (checked before anything runs, so no result is lost)."""
    if output is None:
        return
    path = Path(output)
    if path.is_dir():
        raise UserError(f"--output {output} is a folder; name a file, e.g. {path / 'eval.json'}")
    if not path.resolve().parent.is_dir():
        raise UserError(f"--output {output}: {missing_folder_error(path.parent)}")
    try:
        check_writable(path.resolve().parent, what="the results")
    except CheckpointError as e:  # its message is about the folder: name the argument too
        raise UserError(f"--output {output}: {e}") from None


def pick_split(cfg: Config, requested: str | None, config_file: str | None = None) -> str:
    """--split if it is one of the config's splits, else data.eval_split; never a silent fallback.
    config_file names the config in the errors (None: the default config)."""
    named = config_file or "the default config"
    known = {cfg.data.split: "data.split"} | ({cfg.data.eval_split: "data.eval_split"} if cfg.data.eval_split else {})
    if requested is None:
        if cfg.data.eval_split is None:
            raise UserError(
                f"{named} names no eval split (data.eval_split is null): pass --split {cfg.data.split} "
                "to evaluate on training prompts, or set data.eval_split"
            )
        return cfg.data.eval_split
    if requested not in known:
        names = ", ".join(f"{name} ({key})" for name, key in known.items())
        raise UserError(f"unknown --split {requested!r}: the splits of {named} are {names}")
    return requested


def eval_examples(cfg: Config, split: str, num: int | None) -> list[Example]:
    """The first `num` examples of the split (default: eval.num_prompts). --num may ask for more than
    data.num_eval (which caps an eval split only by default), but not for more than the split holds:
    an accuracy over fewer rows than asked is refused, not reported as if it were the one asked for."""
    if num is None and cfg.eval.num_prompts == 0:
        raise UserError("nothing to evaluate: eval.num_prompts is 0 (it follows data.num_eval); pass --num N")
    examples = build_dataset(cfg.data, split, limit=num or cfg.eval.num_prompts)
    if not examples:
        raise UserError(f"the {split!r} split holds no example")
    unanswered = [i for i, ex in enumerate(examples) if not rewards.reference_answer(ex.answer)]
    if unanswered:  # it would count as a wrong completion, while the correctness reward leaves it unscored
        first = examples[unanswered[0]].prompt
        raise UserError(
            f"{len(unanswered)} of the {len(examples)} examples of the {split!r} split have no reference answer "
            f"(the first: example {unanswered[0]}, {str(first)[:60]!r}): accuracy needs one in data.answer_field="
            f"{cfg.data.answer_field!r}"
        )
    if num is not None and len(examples) < num:
        raise UserError(f"--num {num}: the {split!r} split holds only {len(examples)} examples")
    refuse_loop_columns(examples, data_source(cfg), episodes=cfg.env.kind is not None)  # as training refuses them
    return examples


def model_before_load(source: str | None, tokenizer: Any) -> tuple[ModelArgs | None, Any]:
    """The architecture and tokenizer of the model to evaluate, read without its weights: a local
    folder's config.json (with `tokenizer`, check_model_source's), or a GGUF file's header and
    vocabulary (`smollm2`: the packaged one); (None, None) for a hub id, known once fetched."""
    if source is None:  # model.arch: random weights, no tokenizer
        return None, None
    config_file = Path(source).expanduser() / "config.json"
    if config_file.is_file():
        return ModelArgs.from_hf_config(json.loads(config_file.read_text(encoding="utf-8"))), tokenizer
    if source in PACKAGED_MODELS or (source.lower().endswith(".gguf") and Path(source).expanduser().is_file()):
        from minigrpo.models.gguf import GGUFCheckpoint, packaged_gguf

        gguf = GGUFCheckpoint(packaged_gguf(source) if source in PACKAGED_MODELS else Path(source).expanduser())
        return ModelArgs.from_hf_config(gguf.config), gguf.tokenizer()
    return None, None


def check_fits(
    cfg: Config,
    examples: list[Example],
    tokenizer: Any,
    args: ModelArgs,
    device: torch.device,
    batch: int,
    adapter: bool,
) -> None:
    """The prompts render and fit the model's positions with eval.max_new_tokens (prompt_fit), and on
    CUDA a batch's KV cache and sampling buffers fit the device's memory (eval_memory)."""
    _, longest = prompts_that_fit(cfg, examples, tokenizer, position_limit(args), evaluating=True)
    if device.type == "cuda":
        eval_preflight(cfg, args, device, longest, batch_size=batch, num_examples=len(examples), adapter=adapter)


def results_json(results: dict[str, Any]) -> str:
    """The results as strict JSON: a mean over no score (NaN) or an infinite value is null, as in
    metrics.jsonl; Python's json would write NaN, which JSON readers (jq, JavaScript) refuse."""

    def plain(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return json.dumps(plain(results), indent=2, default=str, allow_nan=False) + "\n"


def pick_checkpoint(given: Path) -> Path | None:
    """A run folder's newest intact checkpoint (else its final model), printed; None for any other folder."""
    picked = run_folder_pick(given, "evaluate")
    if picked is not None:
        print(f"{given} is a run folder: evaluating {picked}")
    return picked


def load_for_eval(args, ckpt: Path, given: Path) -> tuple:
    """Check every argument against the folder `ckpt` (`given`, or a run folder's pick), then load its
    model: (cfg, model, tokenizer, examples, split, reward specs). args.checkpoint names the folder."""
    if ckpt != given:
        args.checkpoint = str(ckpt)
    config_file = run_config_of(ckpt, args.config)
    cfg = load_config(config_file, args.overrides)
    adapter = (ckpt / "adapter_config.json").is_file()  # a LoRA run: its base model plus the saved adapter
    if adapter:
        peft_config = check_peft_adapter(ckpt)
        if config_file is None:
            take_adapter_base(cfg, ckpt, peft_config, args.overrides)
        take_adapter_shape(cfg, peft_config, ckpt / "adapter_config.json")
    split = pick_split(cfg, args.split, config_file)
    check_output(args.output)
    specs = rewards.build_reward_specs(cfg.rewards)
    check_environment(cfg)  # env.kind: the tools and the user class import, before any weights load
    source = cfg.model.name_or_path if adapter else args.checkpoint
    tokenizer = check_model_source(
        source, revision=cfg.model.revision, key="model.name_or_path" if adapter else "--checkpoint"
    )
    if adapter:  # its layers and shapes against the base's config, before the base loads
        check_adapter_fits(ckpt, source)
    model_args, tokenizer = model_before_load(source, tokenizer)
    if tokenizer is not None:  # a local model folder or a GGUF file: env.kind needs its chat template
        check_chat_template(cfg, tokenizer)
    examples = eval_examples(cfg, split, args.num)
    device = pick_device(cfg.run.device)
    set_run_device(device)  # reward models on "auto" / "cuda" load beside the policy
    check_dtype(cfg, device)  # float16 on the CPU: a warning, before any weights load, as training gives
    if model_args is not None:
        check_fits(cfg, examples, tokenizer, model_args, device, args.batch_size, adapter)
    dtype = compute_dtype(cfg, device)
    if adapter:
        model, tokenizer = load_policy(cfg, device, dtype)
        lora.load_peft_adapter(model, ckpt)
        lora.merge_and_unload(model)  # one GEMM per projection, as the merged export (NF4 bases keep theirs)
    else:
        model, tokenizer = load_pretrained(args.checkpoint, dtype=dtype, device=device)
    if model_args is None and tokenizer is not None:  # a hub model, known once fetched: checked before generating
        check_chat_template(cfg, tokenizer)
        check_fits(cfg, examples, tokenizer, model.args, device, args.batch_size, adapter)
    if config_file is None:  # a bare model: the default task; told once it loaded, so that a mistake is one line
        print(f"note: no run config found for {ckpt}: the default config is used (pass --config)", file=sys.stderr)
    return cfg, model, tokenizer, examples, split, specs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: a bad argument, config, checkpoint or output path is one `error:` line."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> dict[str, Any]:
    args = parse_args(argv)
    if env_world_size() > 1:  # every rank would score the whole split and write --output
        raise UserError("python -m minigrpo.eval runs in one process; launch it without torchrun")
    given = Path(args.checkpoint)
    loaded = read_vanishing(given, pick_checkpoint, lambda ckpt: load_for_eval(args, ckpt, given))
    cfg, model, tokenizer, examples, split, specs = loaded
    results = evaluate(cfg, model.eval(), tokenizer, examples, batch_size=args.batch_size, specs=specs)
    settings = {"split": split, "samples_per_prompt": cfg.eval.samples_per_prompt, "temperature": cfg.eval.temperature}
    results = {"checkpoint": args.checkpoint, **settings, **results}  # the folder evaluated (a run folder's pick)
    print(f"{args.checkpoint} on the {split!r} split ({results['num_examples']} examples, {results['seconds']:.1f}s):")
    for key, value in results.items():
        if key.startswith(("accuracy", "pass@", "maj@", "reward", "env/")):
            print(f"  {key:<28} {value:.4f}")
    if args.output:
        write_atomic(Path(args.output), results_json(results))
    return results


if __name__ == "__main__":
    main()
