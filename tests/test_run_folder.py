"""The run folder: a run killed after its final checkpoint is completed by --resume (its final model,
merged export and curves written from that checkpoint), a complete run says so in one line, and what
a resume would fail on after the weights load (a read-only run folder, another architecture in the
model folder) is refused before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers.runs import launch, run_config
from safetensors.torch import load_file

import minigrpo.lora
from minigrpo.errors import UserError


def tensors(folder: Path) -> dict:
    """Every tensor of the safetensors files of a folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no weights in {folder}"
    return out


def assert_equal_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and bool((a[name] == b[name]).all()), name


def killed_while_writing(real, out_index: int = 2):
    """A writer that writes one file of its folder, then is killed (Ctrl-C) before the rest."""

    def write(*args, **kwargs):
        folder = Path(args[out_index])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    return write


def test_a_lora_run_killed_before_its_merged_export_is_completed_by_resume(tmp_path, monkeypatch, capsys):
    """Killed while writing run_dir/merged (after the step-2 checkpoint, the curves never drawn):
    --resume with train.steps unchanged writes the merged export, equal bitwise to an uninterrupted
    run's, and the curves, saying so; a second --resume is one error line: the run is complete."""
    cfg = run_config(
        tmp_path,
        lora={"enabled": True, "r": 4, "alpha": 8},
        train={"steps": 2, "lr": 0.01, "micro_batch_size": 32},
        checkpoint={"every": 1, "save_final": True, "save_merged": True},
        log={"plots": True, "progress": False, "sample_every": 0},
    )
    launch(tmp_path, {**cfg, "run": {**cfg["run"], "name": "straight"}})
    real = minigrpo.lora.save_merged
    monkeypatch.setattr(minigrpo.lora, "save_merged", killed_while_writing(real))
    with pytest.raises(SystemExit) as exit_info:
        launch(tmp_path, cfg)
    assert exit_info.value.code == 130
    monkeypatch.setattr(minigrpo.lora, "save_merged", real)
    run = tmp_path / "runs" / "run"
    assert not (run / "merged").exists(), "a half-written merged export sits where a whole one is expected"
    (run / "curves.png").unlink()  # a kill (SIGKILL) draws no final curves
    capsys.readouterr()

    assert launch(tmp_path, cfg, "--resume") == launch_records(run)  # no step ran: the records are the same
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == (
        f"{run} ran to train.steps=2 ({run / 'checkpoints' / 'step_000002'}) but lacks final outputs: "
        "writing merged, curves.png"
    )
    assert_equal_tensors(tensors(run / "merged"), tensors(tmp_path / "runs" / "straight" / "merged"))
    assert (run / "curves.png").stat().st_size > 0
    assert not list(run.glob(".merged*")), "the temporary folder was left behind"

    before = (run / "merged" / "model.safetensors").stat().st_mtime_ns
    from minigrpo.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(tmp_path / "run.yaml"), "--resume"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {run} is complete: its checkpoint {run / 'checkpoints' / 'step_000002'} is at train.steps=2, so "
        "there is nothing to run; raise train.steps to continue the run"
    ]
    assert (run / "merged" / "model.safetensors").stat().st_mtime_ns == before


def launch_records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_an_sft_run_killed_before_its_final_model_is_completed_by_resume(tmp_path, monkeypatch, capsys):
    """SFT killed while writing run_dir/model after its final checkpoint: --resume writes the model
    (the checkpoint's weights, bitwise) instead of refusing."""
    from test_sft import format_task, sft_config
    from test_sft import launch as launch_sft

    import minigrpo.sft as sft_module

    format_task(tmp_path, n=16)
    cfg = sft_config(tmp_path, train={"steps": 2}, sft={"batch_size": 8, "micro_batch_size": 8})
    real = sft_module.save_pretrained
    monkeypatch.setattr(sft_module, "save_pretrained", killed_while_writing(real))
    with pytest.raises(SystemExit) as exit_info:
        launch_sft(tmp_path, "sft", cfg)
    assert exit_info.value.code == 130
    monkeypatch.setattr(sft_module, "save_pretrained", real)
    run = tmp_path / "runs" / "sft"
    assert not (run / "model").exists(), "a half-written model folder would pass as model.name_or_path"
    capsys.readouterr()

    assert [r["step"] for r in launch_sft(tmp_path, "sft", cfg, "--resume")] == [1, 2]
    out = capsys.readouterr().out
    assert "lacks final outputs: writing model" in out and f"SFT model written to {run / 'model'}" in out
    assert_equal_tensors(tensors(run / "model"), tensors(run / "checkpoints" / "step_000002"))
    assert (run / "model" / "tokenizer.json").is_file()

    with pytest.raises(SystemExit) as exit_info:
        launch_sft(tmp_path, "sft", cfg, "--resume")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("so there is nothing to run; raise train.steps to continue the run")


def test_a_resume_below_the_checkpoint_step_is_refused(tmp_path):
    from minigrpo.build import check_run_dir
    from minigrpo.config import load_config

    cfg = run_config(tmp_path, train={"steps": 2}, checkpoint={"every": 2})
    launch(tmp_path, cfg)
    path = tmp_path / "less.yaml"
    path.write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], "steps": 1}}))
    with pytest.raises(UserError, match=r"train\.steps=1 is before its step 2"):
        check_run_dir(load_config(path, ["run.resume=true"]))


@pytest.mark.parametrize("resume", [False, True])
def test_a_read_only_run_folder_is_refused_before_loading(tmp_path, monkeypatch, resume):
    """The run folder (config.yaml, metrics.jsonl) cannot be written while its checkpoints/ can: one
    line naming the folder, not a failure after the weights load. Tests run as root, which writes
    anywhere: the file system's answer is simulated."""
    from minigrpo import checkpoint
    from minigrpo.build import check_run_dir
    from minigrpo.config import load_config

    cfg = run_config(tmp_path, train={"steps": 1}, checkpoint={"every": 1})
    launch(tmp_path, cfg)
    run_dir = tmp_path / "runs" / ("run" if resume else "fresh")
    run_dir.mkdir(exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    read_only = lambda folder: "Read-only file system" if Path(folder) == run_dir else None
    monkeypatch.setattr(checkpoint, "write_probe_error", read_only)
    path = tmp_path / "again.yaml"
    path.write_text(
        yaml.safe_dump({**cfg, "run": {**cfg["run"], "name": run_dir.name}, "train": {**cfg["train"], "steps": 2}})
    )
    overrides = ["run.resume=true"] if resume else []
    with pytest.raises(UserError, match=rf"^cannot write the run's files to {run_dir}: Read-only file system$"):
        check_run_dir(load_config(path, overrides))


def test_a_model_folder_holding_another_architecture_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """--resume of a full fine-tuning run whose model.name_or_path folder now holds a wider model: one
    line naming the checkpoint's config.json and the folder's, before the policy loads."""
    from helpers.tiny import tiny_run_checkpoint

    from minigrpo import build

    cfg = run_config(tmp_path, train={"steps": 1}, checkpoint={"every": 1})
    launch(tmp_path, cfg)
    other = tmp_path / "model"
    for f in other.iterdir():
        f.unlink()
    tiny_run_checkpoint(other, seed=0, hidden_size=128)

    def no_loading(*args, **kwargs):
        raise AssertionError("the policy loaded before the architectures were compared")

    monkeypatch.setattr(build, "load_policy", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        launch(tmp_path, {**cfg, "train": {**cfg["train"], "steps": 2}}, "--resume")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    ckpt = tmp_path / "runs" / "run" / "checkpoints" / "step_000001"
    assert message.startswith(f"error: --resume from {ckpt}: its {ckpt / 'config.json'} and model.name_or_path's ")
    assert "are different architectures (dim 64 vs 128" in message, message


def test_a_lora_resume_onto_another_base_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    """The base folder replaced by a model of another width: the adapter's shapes are checked against its
    config.json before the base loads (the error came only after loading it)."""
    import shutil

    from helpers.tiny import tiny_run_checkpoint

    from minigrpo import build
    from minigrpo.config import Config

    cfg = run_config(
        tmp_path,
        lora={"enabled": True, "r": 4, "alpha": 8},
        train={"steps": 1, "lr": 0.01, "micro_batch_size": 32},
        checkpoint={"every": 1, "save_final": False},
    )
    launch(tmp_path, cfg)
    shutil.rmtree(tmp_path / "model")
    tiny_run_checkpoint(tmp_path / "model", seed=1, hidden_size=32, intermediate_size=64)
    monkeypatch.setattr(build, "load_pretrained", lambda *a, **k: pytest.fail("the base model was loaded"))
    resumed = Config.from_dict({**cfg, "run": {**cfg["run"], "resume": True}, "train": {**cfg["train"], "steps": 2}})
    with pytest.raises(UserError) as e:
        build.check_before_loading(resumed)
    checkpoint = tmp_path / "runs" / "run" / "checkpoints" / "step_000001"
    assert str(e.value).startswith(f"--resume from {checkpoint} onto model.name_or_path={tmp_path / 'model'}: ")
    assert "has shape [4, 64], this model needs [4, 32]" in str(e.value)
