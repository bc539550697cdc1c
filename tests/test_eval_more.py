"""`python -m minigrpo.eval` given a run folder: it evaluates the run's newest intact checkpoint (a
broken newer one is passed over), or its final model when it has no checkpoint, and says which; a run
with nothing to evaluate is one `error:` line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.runs import launch, run_config

from minigrpo import eval as evaluation

ARGS = ["--split", "train", "--num", "4", "--set", "sampler.max_new_tokens=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 2-step run on the copy task with a checkpoint after each step."""
    root = tmp_path_factory.mktemp("evalrun")
    cfg = run_config(
        root,
        run={"name": "two"},
        train={"steps": 2, "micro_batch_size": 4},
        grpo={"prompts_per_step": 2, "group_size": 2},
        checkpoint={"every": 1, "save_final": True},
    )
    launch(root, cfg)
    return root / "runs" / "two"


def scores(checkpoint: Path, *extra: str) -> dict:
    results = evaluation.main(["--checkpoint", str(checkpoint), *ARGS, *extra])
    return {k: v for k, v in results.items() if k not in ("seconds",)}


def test_a_run_folder_is_its_newest_checkpoint(run, capsys):
    newest = run / "checkpoints" / "step_000002"
    direct = scores(newest)
    capsys.readouterr()
    for folder in (run, run / "checkpoints"):
        picked = scores(folder)
        assert picked == direct and picked["checkpoint"] == str(newest)
        assert f"{folder} is a run folder: evaluating {newest}" in capsys.readouterr().out


def test_a_broken_newest_checkpoint_is_passed_over(run, tmp_path):
    """A run whose newest checkpoint was cut short (a crash while copying it) is evaluated on the one
    before, as a resume would start from it; when every checkpoint is broken the error names the file."""
    copy = tmp_path / "copy"
    for path in run.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(run)).write_bytes(path.read_bytes())
    weights = copy / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    older = copy / "checkpoints" / "step_000001"
    picked = scores(copy)
    assert picked["checkpoint"] == str(older) and picked == {**scores(older), "checkpoint": str(older)}
    older_weights = older / "model.safetensors"
    older_weights.write_bytes(older_weights.read_bytes()[:1000])
    with pytest.raises(evaluation.UserError) as e:
        evaluation._main(["--checkpoint", str(copy), *ARGS])
    message = str(e.value)
    assert message.startswith(f"--checkpoint {copy}: a run folder whose checkpoints are all broken")
    assert str(weights) in message and "\n" not in message


def test_a_run_folder_without_checkpoints(run, tmp_path, capsys):
    """No checkpoint at all: the run's final model (a LoRA run's merged/) if there is one, else one line."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    (bare / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(SystemExit) as info:
        evaluation.main(["--checkpoint", str(bare), *ARGS])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0
    assert err == (
        f"error: --checkpoint {bare}: a run folder with nothing to evaluate (no checkpoints/step_* folder, no "
        "final merged or model folder): train with checkpoint.every or checkpoint.save_final"
    )
    merged = bare / "merged"
    merged.mkdir()
    for f in (run / "checkpoints" / "step_000002").iterdir():
        if f.is_file() and f.name != "run_config.yaml":
            (merged / f.name).write_bytes(f.read_bytes())
    picked = scores(bare)
    assert picked == {**scores(run / "checkpoints" / "step_000002"), "checkpoint": str(merged)}


def test_a_lora_checkpoint_keeps_its_own_rank_under_another_config(tmp_path):
    """A config with lora.enabled and another rank or alpha than the adapter's (the shipped LoRA config
    for a run trained with --set lora.r=4) used to fail with 'r=4 ... but the model's adapters have r=16'
    once the base had loaded; the adapter's own shape is evaluated, as its merged model is."""
    import torch
    from helpers.tiny import tiny_run_checkpoint, write_copy_task

    from minigrpo.config import LoRACfg
    from minigrpo.lora import apply_lora
    from minigrpo.lora_export import save_merged, save_peft_adapter
    from minigrpo.models.loading import load_pretrained

    model, tokenizer = load_pretrained(tiny_run_checkpoint(tmp_path / "base", seed=2))
    apply_lora(model, LoRACfg(enabled=True, r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    save_merged(model, tokenizer, tmp_path / "merged", dtype=torch.float32)
    write_copy_task(tmp_path / "rows.jsonl", n=6)
    common = ["run.device=cpu", "data.source=jsonl", f"data.path={tmp_path / 'rows.jsonl'}", "data.eval_split=null"]
    common += [f"model.name_or_path={tmp_path / 'base'}"]  # after ARGS' --set
    adapted = scores(tmp_path / "adapter", *common, "lora.enabled=true", "lora.r=16", "lora.alpha=2")
    merged = scores(tmp_path / "merged", *common)
    base = scores(tmp_path / "base", *common)
    texts = [[s["completion"] for s in r["samples"]] for r in (adapted, merged, base)]
    assert texts[0] == texts[1] != texts[2]
    assert adapted["reward"] == merged["reward"] and adapted["accuracy"] == merged["accuracy"]


def test_several_samples_per_prompt_give_pass_and_majority_at_k(run):
    """k completions per prompt: accuracy is their mean, pass@k the share of prompts with one of them
    right, maj@k the share whose most frequent answer is right; an example's draws do not depend on
    --batch-size, and k > 1 without a temperature is one config line."""
    checkpoint = run / "checkpoints" / "step_000002"
    sampled = ["--set", "eval.temperature=1.0", "--samples-per-prompt", "4"]
    results = scores(checkpoint, *sampled, "--batch-size", "3")
    assert results == scores(checkpoint, *sampled, "--batch-size", "1")
    assert set(results) >= {"accuracy", "pass@4", "maj@4"} and results["num_examples"] == 4
    assert results["accuracy"] <= results["pass@4"] and results["maj@4"] <= results["pass@4"]
    assert "pass@1" not in scores(checkpoint, "--set", "eval.temperature=1.0")
    with pytest.raises(evaluation.UserError, match=r"eval.samples_per_prompt=2 needs eval.temperature > 0"):
        evaluation._main(["--checkpoint", str(checkpoint), *ARGS, "--samples-per-prompt", "2"])
    with pytest.raises(evaluation.UserError, match=r"^--samples-per-prompt must be >= 1, got 0$"):
        evaluation._main(["--checkpoint", str(checkpoint), *ARGS, "--samples-per-prompt", "0"])


def test_pass_and_majority_at_k_by_hand():
    """Two examples, three samples each: 18 / 18.0 / 17 votes 18 (right); 5, no answer, 6 is a tie that
    the first given answer (5, wrong) wins, though one sample (6) is right."""
    correct = [True, True, False, False, False, True]
    given = ["18", "18.0", "17", "5", None, "6"]
    assert evaluation.sample_metrics(correct, given, ["18", "6"], 3) == {"pass@3": 1.0, "maj@3": 0.5}
    assert evaluation.sample_metrics([False] * 2, [None, None], ["1"], 2) == {"pass@2": 0.0, "maj@2": 0.0}


def test_reward_functions_see_the_conversation_the_policy_saw(run):
    """As in training, a reward function (a reward model) gets `prompt_messages`: data.system_prompt
    included."""
    from minigrpo.config import RewardSpec, load_config
    from minigrpo.models.loading import load_pretrained

    cfg = load_config(str(run / "config.yaml"), ["data.system_prompt=Be brief.", "eval.max_new_tokens=1"])
    model, tokenizer = load_pretrained(str(run / "checkpoints" / "step_000002"))
    examples = evaluation.eval_examples(cfg, "train", 3)
    specs = evaluation.rewards.build_reward_specs([RewardSpec(name="helpers.reward_fns:sees_system_prompt")])
    results = evaluation.evaluate(cfg, model.eval(), tokenizer, examples, specs=specs)
    assert results["reward"] == 1.0


def test_eval_under_torchrun_is_one_line(run, monkeypatch):
    """Every rank would score the whole split and write --output: refused before anything loads."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(evaluation.UserError, match=r"^python -m minigrpo.eval runs in one process; launch it"):
        evaluation._main(["--checkpoint", str(run), *ARGS])


def test_a_checkpoint_deleted_by_a_run_still_training_is_picked_again(run, tmp_path, monkeypatch, capsys):
    """`--checkpoint RUN` while the run trains with checkpoint.keep_last=1: the checkpoint picked is pruned
    before its weights load. It died with a FileNotFoundError traceback; the newest intact one now is
    evaluated (the same scores as evaluating it directly), and named."""
    import shutil

    from test_export_more import vanish_after_pick

    copy = tmp_path / "two"
    shutil.copytree(run, copy)
    older = copy / "checkpoints" / "step_000001"
    want = scores(older)
    capsys.readouterr()
    removed = vanish_after_pick(monkeypatch, 1)
    got = scores(copy)
    assert removed == [copy / "checkpoints" / "step_000002"]
    assert got == {**want, "checkpoint": str(older)}
    assert f"{copy} is a run folder: evaluating {older}" in capsys.readouterr().out


def test_a_checkpoints_folder_without_a_checkpoint_names_the_half_written_one(run, tmp_path, capsys):
    """A run killed while it wrote its first checkpoint leaves checkpoints/.tmp-step_000001 only. Given as
    `--checkpoint RUN/checkpoints`, that folder was taken for a model folder ('no config.json in
    .../checkpoints: not a model folder'); it is the run's folder, with nothing to evaluate, and the
    half-written checkpoint is named (given as RUN too)."""
    import shutil

    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "metrics.jsonl", killed / "metrics.jsonl")
    shutil.copytree(run / "checkpoints" / "step_000001", killed / "checkpoints" / ".tmp-step_000001")
    for given in (killed / "checkpoints", killed):
        with pytest.raises(SystemExit) as info:
            evaluation.main(["--checkpoint", str(given), *ARGS])
        assert info.value.code == 2
        assert capsys.readouterr().err == (
            f"error: --checkpoint {given}: a run folder with nothing to evaluate (no checkpoints/step_* folder, only "
            "the half-written .tmp-step_000001, no final merged or model folder): train with checkpoint.every or "
            "checkpoint.save_final\n"
        )


def test_a_gguf_exported_beside_a_checkpoint_is_evaluated_with_its_run_config(run, tmp_path):
    """python -m minigrpo.export writes step_N.<type>.gguf beside checkpoints/step_N: evaluating that file
    takes step_N's run_config.yaml (the run's data, rewards and lengths), not the default task; a GGUF
    with no such folder beside it has no run config (the command then says the default config is used)."""
    gguf = run / "checkpoints" / "step_000002.q8_0.gguf"
    gguf.write_bytes(b"")  # only its name and place are read here
    try:
        expected = run / "checkpoints" / "step_000002" / "run_config.yaml"
        assert evaluation.run_config_of(gguf, None) == str(expected) and expected.is_file()
        assert evaluation.run_config_of(gguf, "mine.yaml") == "mine.yaml"
    finally:
        gguf.unlink()
    for lone in ("model.q8_0.gguf", "model.gguf"):
        (tmp_path / lone).write_bytes(b"")
        assert evaluation.run_config_of(tmp_path / lone, None) is None


def copy_run(run: Path, to: Path) -> Path:
    """A copy of the run folder `run` at `to` (its checkpoints to be damaged there)."""
    import shutil

    shutil.copytree(run, to)
    return to


def test_a_step_saved_again_and_killed_between_its_renames_is_evaluated(run, tmp_path, capsys):
    """A save of step 2 again, killed between its two renames, leaves .tmp-old-step_000002 (the earlier
    folder) and .tmp-step_000002 (the new one, whole) with no step_000002: a resume continues from the new
    folder, eval evaluated step_000001 in silence. It now evaluates .tmp-step_000002 and says why."""
    import shutil

    copy = copy_run(run, tmp_path / "two")
    root = copy / "checkpoints"
    want = scores(root / "step_000002")
    (root / "step_000002").rename(root / ".tmp-old-step_000002")
    shutil.copytree(root / ".tmp-old-step_000002", root / ".tmp-step_000002")
    capsys.readouterr()
    got = scores(copy)
    moved = root / ".tmp-step_000002"
    assert got == {**want, "checkpoint": str(moved)}
    captured = capsys.readouterr()
    assert f"{copy} is a run folder: evaluating {moved}" in captured.out
    assert f"warning: step 2 was being saved again when its run stopped: using {moved}" in captured.err


def test_a_passed_over_checkpoint_is_named_in_a_warning(run, tmp_path, capsys):
    """A newest checkpoint whose trainer state is cut short is passed over as before (step_000001 is
    evaluated), and a warning line now names its bad file; without it the user could not tell that the
    scores are of an older checkpoint."""
    copy = copy_run(run, tmp_path / "two")
    state = copy / "checkpoints" / "step_000002" / "trainer_state" / "state.json"
    state.write_text(state.read_text()[:50])
    capsys.readouterr()
    assert scores(copy)["checkpoint"] == str(copy / "checkpoints" / "step_000001")
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipping")]
    assert len(warned) == 1 and f"{state}: not valid JSON" in warned[0], warned


def test_a_newest_checkpoint_that_cannot_be_read_is_one_error_line(run, tmp_path, monkeypatch, capsys):
    """Its run_config.yaml refused by the system (an I/O error): step_000001 was evaluated in its place
    without a word; now one `error:` line names the file and the checkpoint, exit status 2."""
    from test_checkpoint_recovery import unreadable

    copy = copy_run(run, tmp_path / "two")
    newest = copy / "checkpoints" / "step_000002"
    unreadable(monkeypatch, newest / "run_config.yaml")
    with pytest.raises(SystemExit) as info:
        evaluation.main(["--checkpoint", str(copy), *ARGS])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err == (
        f"error: --checkpoint {copy}: {newest / 'run_config.yaml'} cannot be read (Input/output error), so its "
        f"checkpoint {newest} may be intact and is not passed over for an older one; make the file readable, or "
        "give an older checkpoint folder as --checkpoint\n"
    )
