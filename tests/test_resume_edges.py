"""--resume and Ctrl-C at the edges: a run resumed on another device computes in the dtype it ran in
(or is refused, naming run.device and run.dtype), and the line Ctrl-C prints names the checkpoint a
resume would really take (the newest intact one), or says there is none."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.runs import launch, run_config
from helpers.tiny import tiny_model

from minigrpo.bookkeeping import interrupted
from minigrpo.checkpoint import load_trainer_state, save_checkpoint, verify_checkpoint
from minigrpo.config import Config
from minigrpo.configio import parse_yaml
from minigrpo.errors import UserError
from minigrpo.run_folder import check_run_dir, resumable_changes

NO_OPTIMIZER_STATE = {"format": "by_name", "param_names": [], "param_groups": [], "group_sizes": [], "state": {}}


def save_step(run_dir: Path, step: int, run_config: dict | None = None, **state_changes) -> Path:
    """Checkpoint `step` as the trainer writes it (a tiny model, an empty optimizer state)."""
    state = {"optimizer": NO_OPTIMIZER_STATE, "scheduler": {"last_epoch": step}, "data": {"epoch": 0, "index": step}}
    return save_checkpoint(
        run_dir, step, model=tiny_model(seed=step), tokenizer=None, keep_last=5, run_config=run_config,
        trainer_state={**state, **state_changes},
    )  # fmt: skip


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ------------------------------------------------------------------------------------------------
# Ctrl-C


def interrupted_line(run_dir: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        interrupted(run_dir)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_ctrl_c_names_the_newest_intact_checkpoint_not_a_newer_broken_one(tmp_path, capsys):
    """Before: it named the newest step folder (step_000004, whose weights are cut short), which --resume
    then skips with a warning: the user was told to continue from a checkpoint nothing continues from."""
    good = save_step(tmp_path, 2)
    truncate(save_step(tmp_path, 4) / "model.safetensors")
    assert interrupted_line(tmp_path, capsys) == f"interrupted: continue from {good} with --resume\n"


def test_ctrl_c_with_every_checkpoint_broken_says_there_is_none(tmp_path, capsys):
    """Before: `continue from .../step_000002 with --resume`, a checkpoint missing its trainer state."""
    (save_step(tmp_path, 2) / "trainer_state" / "state.json").unlink()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    line = interrupted_line(tmp_path, capsys)
    assert line.startswith("interrupted: no intact checkpoint to resume from in "), line
    assert "step_000002/trainer_state/state.json is missing" in line and "continue from" not in line, line
    assert line.endswith(f"delete {tmp_path} or set another run.name\n"), line


# ------------------------------------------------------------------------------------------------
# the compute dtype across devices


def saved_run(tmp_path: Path, device: str, setting: str = "auto", **state_changes) -> Config:
    """A run checkpointed at step 1 with run.device `device` and run.dtype `setting` (state_changes: its
    trainer state's, such as the dtype it computed in); returns its config for a resume to 3 steps."""
    cfg = Config()
    cfg.run.output_dir, cfg.run.name, cfg.train.steps = str(tmp_path), "run", 1
    cfg.run.device, cfg.run.dtype = device, setting
    save_step(cfg.run.run_dir, 1, run_config=cfg.to_dict(), **state_changes)
    resumed = copy.deepcopy(cfg)
    resumed.run.resume, resumed.train.steps = True, 3
    return resumed


def resume_error(cfg: Config) -> str | None:
    try:
        check_run_dir(cfg, resumable_changes(cfg))
    except UserError as e:
        return str(e)
    return None


def test_a_run_saved_on_cuda_resumed_on_the_cpu_is_refused_naming_device_and_dtype(tmp_path):
    """run.dtype auto is bfloat16 on CUDA and float32 on the CPU. Before: the resume was accepted (run.device
    may change) and the run went on in float32, its bf16 weights cast, nothing said."""
    cfg = saved_run(tmp_path, "cuda", dtype="bfloat16")
    cfg.run.device = "cpu"
    message = resume_error(cfg)
    assert message is not None and "\n" not in message, message
    assert message.startswith(f"--resume from {cfg.run.run_dir / 'checkpoints' / 'step_000001'}: "), message
    assert "run.device='cpu' with run.dtype='auto' computes in float32, but the run computed in bfloat16" in message
    assert "(run.device='cuda', run.dtype='auto' there): set run.dtype=bfloat16" in message, message


def test_naming_the_dtype_auto_meant_resumes_on_the_new_device(tmp_path):
    """The fix the refusal names: run.dtype=bfloat16 on the CPU computes as auto did on CUDA, so it is no
    config change (before: `run.dtype: 'auto' there, 'bfloat16' now` refused it, so no fix existed)."""
    cfg = saved_run(tmp_path, "cuda", dtype="bfloat16")
    cfg.run.device, cfg.run.dtype = "cpu", "bfloat16"
    assert resume_error(cfg) is None


def test_a_checkpoint_without_the_recorded_dtype_is_judged_by_its_run_config(tmp_path):
    """A checkpoint written before the trainer state recorded its dtype: run.device cuda with auto there
    meant bfloat16."""
    cfg = saved_run(tmp_path, "cuda")
    cfg.run.device = "cpu"
    message = resume_error(cfg)
    assert message is not None and "computes in float32, but the run computed in bfloat16" in message, message


def test_a_run_saved_with_device_auto_on_a_gpu_is_refused_on_the_cpu(tmp_path):
    """run.device auto on both machines: only the recorded dtype tells that the run computed in bfloat16."""
    cfg = saved_run(tmp_path, "auto", dtype="bfloat16")
    cfg.run.device = "cpu"
    message = resume_error(cfg)
    assert message is not None and "run.device='cpu' with run.dtype='auto' computes in float32" in message, message


@pytest.mark.parametrize("now", ["auto", "float32"])
def test_the_same_dtype_resumes_whether_auto_or_named(tmp_path, now):
    cfg = saved_run(tmp_path, "cpu", dtype="float32")
    cfg.run.dtype = now
    assert resume_error(cfg) is None


def test_another_named_dtype_is_still_refused(tmp_path):
    cfg = saved_run(tmp_path, "cpu", dtype="float32")
    cfg.run.dtype = "bfloat16"
    message = resume_error(cfg)
    assert message is not None and "computes in bfloat16, but the run computed in float32" in message, message


def test_a_training_checkpoint_records_its_compute_dtype(tmp_path):
    """bookkeeping.save writes the dtype the run computed in into the trainer state."""
    cfg = run_config(tmp_path, train={"steps": 1, "micro_batch_size": 16}, checkpoint={"every": 1})
    cfg["grpo"] = {"prompts_per_step": 2, "group_size": 8}
    launch(tmp_path, cfg)
    state = load_trainer_state(tmp_path / "runs" / "run" / "checkpoints" / "step_000001")
    assert state["dtype"] == "float32"


# ------------------------------------------------------------------------------------------------
# run_config.yaml under any locale

SAVE_UNDER_ASCII_LOCALE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from helpers.runs import launch, run_config
from helpers.tiny import tiny_model
from minigrpo.checkpoint import save_checkpoint
state = {"optimizer": %r, "scheduler": {}, "data": {"epoch": 0, "index": 0}}
config = {"data": {"system_prompt": %s}}
model = tiny_model()
save_checkpoint(Path(sys.argv[1]), 1, model=model, tokenizer=None, keep_last=1, run_config=config, trainer_state=state)
"""
PROMPT = "Réponds en français… 🙂 \x85"


def test_run_config_is_utf8_whatever_the_locale(tmp_path):
    """Before: run_config.yaml was written in the locale's encoding, read back as UTF-8: under an ASCII
    (or Latin-1) locale a system prompt with 'é' or '…' crashed the save with a UnicodeEncodeError
    traceback (or left a checkpoint that every resume then skipped as corrupt)."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    tests = str(Path(__file__).parent)
    code = SAVE_UNDER_ASCII_LOCALE % (NO_OPTIMIZER_STATE, ascii(PROMPT))  # ASCII: argv is read in the locale
    script = [sys.executable, "-c", code, str(tmp_path), tests]
    proc = subprocess.run(script, env=env, capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = tmp_path / "checkpoints" / "step_000001"
    assert verify_checkpoint(path)["step"] == 1
    saved = parse_yaml((path / "run_config.yaml").read_text(encoding="utf-8"))
    assert saved == {"data": {"system_prompt": PROMPT}}
