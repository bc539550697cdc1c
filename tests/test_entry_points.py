"""The shipped configs and the command lines other than training's loop, as a user meets them.

Every configs/*.yaml loads and runs one step on the CPU with small overrides (a tiny model, a few
tokens, local data instead of the hub); a config that needs a GPU, run as shipped on a CPU, is one
`error:` line naming run.device. Every entry point answers --help and turns a bad argument into one
`error:` line with exit status 2. Evaluation's metrics are counted by hand against completions
decoded here with plain forward passes; a LoRA checkpoint evaluates as its merged model does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import one_error_line, run_module
from helpers.tiny import tiny_model, tiny_run_checkpoint, write_copy_task

from minigrpo import eval as evaluation
from minigrpo import sft, train
from minigrpo.config import LoRACfg, load_config
from minigrpo.data import Example, encode_prompts
from minigrpo.lora import apply_lora
from minigrpo.lora_export import save_merged, save_peft_adapter
from minigrpo.models.loading import load_pretrained, save_pretrained

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (256 byte tokens, 3 specials) and a chat template."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers as pt

    from minigrpo.tokenizer import Tokenizer

    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(sorted(pt.ByteLevel.alphabet()))}, merges=[]))
    backend.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(
        backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=TEMPLATE
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A tiny model with a chat template (4096 positions: the tool prompts are long in bytes), GSM8K-like
    rows and SFT conversations, standing in for the hub models and data the configs name."""
    root = tmp_path_factory.mktemp("entry")
    save_pretrained(tiny_model(0, vocab_size=259, max_position_embeddings=4096), byte_tokenizer(), root / "model")
    rows = [{"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"#### {i + 2}"} for i in range(8)]
    (root / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    talks = [[{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": str(i + 1)}] for i in range(8)]
    (root / "sft.jsonl").write_text("".join(json.dumps({"messages": t}) + "\n" for t in talks))
    return root


def small_overrides(name: str, root: Path, run_dir: Path) -> list[str]:
    """What makes a shipped config run one quick step on the CPU: the tiny model, a few tokens, two
    prompts, local data for the hub's GSM8K, a CPU optimizer, no plots or checkpoints."""
    text = (CONFIGS / f"{name}.yaml").read_text()
    over = [f"run.output_dir={run_dir}", f"model.name_or_path={root / 'model'}", "train.steps=1"]
    over += ["train.warmup_steps=0", "log.plots=false", "log.progress=false", "checkpoint.save_final=false"]
    if "adamw8bit" in text:
        over.append("train.optimizer=adamw")
    if name.startswith("smollm2_sft"):  # SFT: sft.batch_size conversations a step
        return [*over, "sft.batch_size=2", "sft.micro_batch_size=2", f"sft.path={root / 'sft.jsonl'}"]
    group = 1 if "algorithm: ppo" in text else 2
    over += ["sampler.max_new_tokens=4", "grpo.prompts_per_step=2", f"grpo.group_size={group}"]
    over += ["train.micro_batch_size=2", "ppo.mini_batches=1"]
    if "source: gsm8k" in text:
        over += ["data.source=jsonl", f"data.path={root / 'gsm8k.jsonl'}", "data.eval_split=null"]
    if "env:" in text:
        over.append("env.max_episode_tokens=12")
    return over


def run_entry(name: str, argv: list[str], capsys) -> tuple[int, object, str]:
    """(exit status, returned value, stderr) of the config's entry point (train or sft) in this process."""
    main = sft.main if name.startswith("smollm2_sft") else train.main
    try:
        return 0, main(argv), capsys.readouterr().err
    except SystemExit as e:
        return int(e.code), None, capsys.readouterr().err


def test_every_shipped_config_loads():
    for name in SHIPPED:
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.run.name == name, name  # each writes its own run folder


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_config_runs_one_step_on_the_cpu(name, files, tmp_path, capsys):
    overrides = [*small_overrides(name, files, tmp_path), "run.device=cpu"]
    status, history, err = run_entry(name, ["--config", str(CONFIGS / f"{name}.yaml"), "--set", *overrides], capsys)
    assert status == 0, err[-3000:]
    assert [h["step"] for h in history] == [1]
    assert all(v == v for k, v in history[0].items() if k in ("loss", "grad_norm")), history[0]


@pytest.mark.parametrize("name", [n for n in SHIPPED if "device: cuda" in (CONFIGS / f"{n}.yaml").read_text()])
def test_a_gpu_config_on_a_cpu_is_one_line_naming_the_device(name, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--config", str(CONFIGS / f"{name}.yaml"), "--set", *small_overrides(name, files, tmp_path)]
    status, _, err = run_entry(name, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and "Traceback" not in err, err[-3000:]
    assert lines == ["error: run.device='cuda' but CUDA is not available on this machine (use run.device=cpu)"], err


def test_the_demo_config_runs_through_the_command_line(files, tmp_path):
    argv = small_overrides("demo_cpu", files, tmp_path)
    proc = run_module("minigrpo.train", "--config", str(CONFIGS / "demo_cpu.yaml"), "--set", *argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "demo_cpu" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]


@pytest.mark.parametrize("module", ["minigrpo.train", "minigrpo.sft", "minigrpo.eval", "minigrpo.export"])
def test_every_entry_point_answers_help_and_a_bad_argument(module, tmp_path):
    proc = run_module(module, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout and not proc.stderr.strip(), proc.stderr[-2000:]
    needed = ["--checkpoint", "x"] if module in ("minigrpo.eval", "minigrpo.export") else []
    message = one_error_line(run_module(module, *needed, "--bogus", cwd=tmp_path))
    assert message == f"{module}: unrecognized arguments: --bogus", message  # the command's own name


# ---------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The word-level tiny model with its digit rows of the LM head scaled up: greedy completions hold digits."""
    root = tmp_path_factory.mktemp("digits")
    tiny_run_checkpoint(root / "model")
    model, tokenizer = load_pretrained(root / "model")
    with torch.no_grad():
        model.lm_head.weight[4:14] *= 6.0  # WORDS[4:14] are "0".."9"
    save_pretrained(model, tokenizer, root / "model")
    return root


def greedy_completions(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions decoded with whole forward passes (no KV cache, no sampler), stopping at a stop id."""
    model, tokenizer = load_pretrained(model_dir)
    ids, _ = encode_prompts([Example(prompt=p, answer="") for p in prompts], tokenizer, None)
    texts = []
    for row in ids:
        new: list[int] = []
        with torch.no_grad():
            while len(new) < max_new_tokens:
                token = int(model(torch.tensor([row + new]))[0, -1].argmax())
                if token in tokenizer.stop_ids:
                    break
                new.append(token)
        texts.append(tokenizer.decode(new))
    return texts


def eval_config(root: Path, data: Path, **sections) -> Path:
    cfg = {
        "run": {"name": "ev", "output_dir": str(root / "runs"), "device": "cpu"},
        "model": {"name_or_path": str(root / "model")},
        "data": {"source": "jsonl", "path": str(data), "eval_split": None, "shuffle": False},
        "sampler": {"max_new_tokens": 2},
        "rewards": [{"name": "correctness"}, {"name": "exact_answer"}],
        **sections,
    }
    path = root / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_eval_metrics_count_by_hand(digits, tmp_path, capsys):
    """Seven prompts in batches of 3: accuracy reads the LAST number of a completion, exact_answer the
    first, correctness pays 2; the reference answers make chosen rows right ('99' is never written)."""
    prompts = [f"repeat {d}" for d in (3, 1, 4, 1, 5, 9, 2)]
    texts = greedy_completions(digits / "model", prompts, 2)
    numbers = [re.findall(r"\d", t) for t in texts]
    right = [i for i, n in enumerate(numbers) if n][:4]  # rows made right: their last digit is the answer
    assert len(right) >= 3, texts
    answers = [numbers[i][-1] if i in right else "99" for i in range(len(prompts))]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"question": p, "answer": a}) + "\n" for p, a in zip(prompts, answers)))
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(digits / "model"), "--config", str(eval_config(tmp_path, data)), "--split", "train"]
    results = evaluation.main([*argv, "--num", "7", "--batch-size", "3", "--output", str(out)])
    n = len(prompts)
    first_is_last = sum(numbers[i][0] == numbers[i][-1] for i in right)
    expected = {"accuracy": len(right) / n, "reward/correctness": 2 * len(right) / n}
    expected |= {"reward/exact_answer": first_is_last / n, "reward": (2 * len(right) + first_is_last) / n}
    assert results["num_examples"] == n and [s["completion"] for s in results["samples"]] == texts[:5]
    assert {k: results[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    written = json.loads(out.read_text())
    assert {k: written[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    printed = capsys.readouterr().out
    assert "(7 examples" in printed and f"  {'accuracy':<28} {len(right) / n:.4f}" in printed


def lora_adapter(base: Path, folder: Path) -> tuple[Path, Path]:
    """A LoRA adapter (large B: it changes the greedy tokens) saved bare, as PEFT writes one, and the
    same model merged into a plain checkpoint."""
    model, tokenizer = load_pretrained(base)
    apply_lora(model, LoRACfg(enabled=True, r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    save_peft_adapter(model, folder / "adapter", base_model_name_or_path=str(base))
    save_merged(model, tokenizer, folder / "merged", dtype=torch.float32)
    return folder / "adapter", folder / "merged"


def test_a_bare_lora_adapter_is_evaluated_on_its_own_base_model(digits, tmp_path):
    """Without --config or a run_config.yaml beside it, an adapter's base is the model its
    adapter_config.json names (as the GGUF export merges it), not the default config's SmolLM2."""
    adapter, merged = lora_adapter(digits / "model", tmp_path)
    data = tmp_path / "rows.jsonl"
    write_copy_task(data, n=6)
    common = ["--split", "train", "--num", "6", "--set", "run.device=cpu", "sampler.max_new_tokens=2"]
    common += ["data.source=jsonl", f"data.path={data}", "data.eval_split=null", "data.shuffle=false"]
    adapted = evaluation.main(["--checkpoint", str(adapter), *common])
    reference = evaluation.main(["--checkpoint", str(merged), *common])
    base = evaluation.main(["--checkpoint", str(digits / "model"), *common])
    completions = [[s["completion"] for s in r["samples"]] for r in (adapted, reference, base)]
    assert completions[0] == completions[1] != completions[2]
    assert adapted["accuracy"] == reference["accuracy"]


def test_an_sft_model_is_evaluated_with_its_run_config(digits, tmp_path, capsys):
    """python -m minigrpo.sft ends with run_dir/model; evaluating that folder without --config reads the
    run's config.yaml (its task: data.synthetic), not the default config's task."""
    cfg = {
        "run": {"name": "warmup", "output_dir": str(tmp_path), "device": "cpu"},
        "model": {"name_or_path": str(digits / "model")},
        "data": {"synthetic": {"question": "repeat {expression}", "instruction": None, "operations": ["*"]}},
        "sampler": {"max_new_tokens": 2},
        "sft": {"source": "synthetic", "batch_size": 2, "micro_batch_size": 2, "max_seq_len": 32},
        "train": {"steps": 1},
        "log": {"plots": False, "progress": False},
        "checkpoint": {"save_final": False},
    }
    (tmp_path / "warmup.yaml").write_text(yaml.safe_dump(cfg))
    sft.main(["--config", str(tmp_path / "warmup.yaml")])
    results = evaluation.main(["--checkpoint", str(tmp_path / "warmup" / "model"), "--num", "3"])
    assert [s["prompt"].split()[0] for s in results["samples"]] == ["repeat"] * 3
    assert all(" * " in s["prompt"] for s in results["samples"]), results["samples"]
