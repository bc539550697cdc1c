"""What the command lines tell a user, checked against what is on disk: the line after Ctrl-C of a run
past its final checkpoint, eval of a missing checkpoint, export's default output beside a GGUF file,
the step column of a very long run, and argument mistakes of eval and export (each one `error:` line,
exit status 2, no traceback). The entry points run in this process (their `main(argv)`)."""

from __future__ import annotations

import pytest
import yaml
from helpers.runs import run_config
from helpers.tiny import tiny_run_checkpoint
from test_gguf_export import bpe_tokenizer, family_model

from minigrpo import eval as evaluation
from minigrpo import export
from minigrpo import train as train_module
from minigrpo.bookkeeping import how_to_go_on
from minigrpo.config import load_config
from minigrpo.metrics import MetricsLogger


def exit_and_err(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of an entry point's `main(argv)` that exits."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def one_error(main, argv: list[str], capsys) -> str:
    """The message of the single `error:` line (and nothing else on stderr) of a refused command line."""
    code, err = exit_and_err(main, argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.removeprefix("error: ").rstrip("\n")


# ------------------------------------------------------------------------------------------------
# Ctrl-C after the final checkpoint


def write_config(tmp_path, **sections) -> str:
    """A 2-step run with its final checkpoint (run_config's, `sections` updating it), written as YAML."""
    sections = {"train": {"steps": 2}, **sections}
    sections["checkpoint"] = {"every": 0, "save_final": True, **sections.get("checkpoint", {})}
    cfg = run_config(tmp_path, **sections)
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_ctrl_c_after_the_final_checkpoint_says_the_run_is_complete(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the logger closed, after the final checkpoint, said `continue from .../step_000002 with
    --resume`, and that --resume then said the run was complete. Now the line says so, and where the
    final model is; the --resume it no longer advises agrees."""
    config = write_config(tmp_path)
    close = MetricsLogger.close

    def close_then_ctrl_c(self):
        close(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLogger, "close", close_then_ctrl_c)
    code, err = exit_and_err(train_module.main, ["--config", config], capsys)
    run = tmp_path / "runs" / "run"
    final = run / "checkpoints" / "step_000002"
    assert code == 130
    assert err == f"interrupted: the run is complete: {run} ran to train.steps=2; its final model is {final}\n"
    monkeypatch.undo()
    assert f"{run} is complete: its checkpoint {final} is at train.steps=2" in one_error(
        train_module.main, ["--config", config, "--resume"], capsys
    )


def test_ctrl_c_while_the_merged_export_is_written_names_what_resume_writes(tmp_path, monkeypatch, capsys):
    """A LoRA run with checkpoint.save_merged stopped while writing run_dir/merged: the line names the
    missing folder and --resume, which writes it; after that the run is complete, with merged/ its model."""
    lora = {"enabled": True, "r": 2, "targets": ["q", "v"]}
    config = write_config(tmp_path, lora=lora, checkpoint={"save_merged": True})

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "write_merged", ctrl_c)
    code, err = exit_and_err(train_module.main, ["--config", config], capsys)
    run = tmp_path / "runs" / "run"
    final = run / "checkpoints" / "step_000002"
    assert code == 130 and not (run / "merged").exists()
    assert err == (
        f"interrupted: {run} ran to train.steps=2 ({final}) but lacks merged: rerun with --resume, which writes it "
        "from that checkpoint\n"
    )
    monkeypatch.undo()
    assert train_module.main(["--config", config, "--resume"]) == []
    assert (run / "merged" / "config.json").is_file()
    cfg = load_config(config)
    note = how_to_go_on(run, cfg, train_module.final_folders(cfg))
    assert note == f"the run is complete: {run} ran to train.steps=2; its final model is {run / 'merged'}"


def test_ctrl_c_with_steps_left_leaves_the_line_to_the_checkpoint_to_continue_from(tmp_path):
    """No checkpoint at train.steps (none at all, or an earlier one): the line is about going on."""
    config = write_config(tmp_path)
    cfg = load_config(config)
    assert how_to_go_on(cfg.run.run_dir, cfg) == "no step finished: start the run again"
    train_module.main(["--config", config])  # to step 2 of 2, then 3 steps asked: one left
    cfg.train.steps = 3
    final = cfg.run.run_dir / "checkpoints" / "step_000002"
    assert how_to_go_on(cfg.run.run_dir, cfg) == f"continue from {final} with --resume"


# ------------------------------------------------------------------------------------------------
# eval


@pytest.fixture
def model_dir(tmp_path):
    return tiny_run_checkpoint(tmp_path / "model", seed=0)


def test_eval_of_a_missing_checkpoint_is_the_error_alone(tmp_path, capsys):
    """`--checkpoint MISSING` printed `note: no run config found ...` before its error; now the error is all."""
    missing = tmp_path / "missing"
    assert one_error(evaluation.main, ["--checkpoint", str(missing)], capsys) == (
        f"--checkpoint: no such file or directory: {missing}"
    )
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--set", "model.nope=1"], "unknown config key 'model.nope'"),
        (["--split", "nope"], "unknown --split 'nope': the splits of the default config are"),
        (["--output", ""], "--output is empty: name a file or folder"),
        (["--output=~no_such_user_here/x.json"], "--output ~no_such_user_here/x.json: Could not determine home"),
    ],
)
def test_eval_mistakes_with_a_bare_model_are_one_line(model_dir, capsys, extra, expected):
    """A bare model folder (no run config) with a mistake: the note about the default config came first,
    and `--output=~user/x` with no such user was a RuntimeError traceback."""
    assert one_error(evaluation.main, ["--checkpoint", str(model_dir), *extra], capsys).startswith(expected)


@pytest.mark.parametrize("flag", ["--checkpoint=", "--checkpoint=~no_such_user_here/ckpt"])
def test_eval_and_export_checkpoint_paths_no_file_can_be(capsys, flag):
    expected = "is empty" if flag.endswith("=") else "Could not determine home directory"
    for main in (evaluation.main, export.main):
        message = one_error(main, [flag], capsys)
        assert message.startswith("--checkpoint ") and expected in message, message


@pytest.mark.parametrize("module", ["eval", "export"])
def test_an_unreadable_checkpoint_is_one_line(model_dir, monkeypatch, capsys, module):
    """A checkpoint folder this user may not read was a PermissionError traceback (root reads anything,
    so the denial is simulated where the run folder is listed); run_cli makes it one line for every entry
    point."""
    from minigrpo import run_folder

    def denied(folder, action):
        raise PermissionError(13, "Permission denied", str(folder / "checkpoints"))

    monkeypatch.setattr(evaluation, "run_folder_pick", denied)
    monkeypatch.setattr(run_folder, "run_folder_pick", denied)
    main = evaluation.main if module == "eval" else export.main
    message = one_error(main, ["--checkpoint", str(model_dir)], capsys)
    assert message == f"cannot use {model_dir / 'checkpoints'} (Permission denied)"


# ------------------------------------------------------------------------------------------------
# export


@pytest.fixture
def gguf_file(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    return export.save_gguf(family_model("llama"), bpe_tokenizer(), folder / "m.Q8_0.gguf", "q8_0")


def test_export_of_a_gguf_file_writes_beside_it(tmp_path, gguf_file, monkeypatch, capsys):
    """The default output of a .gguf input was written into the working directory; it is beside the
    input now, named after it, and the working directory stays empty."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = export.main(["--checkpoint", str(gguf_file), "--gguf", "f16"])
    assert out == gguf_file.with_name(f"{gguf_file.name.removesuffix('.gguf')}.f16.gguf") and out.stat().st_size > 0
    assert list(cwd.iterdir()) == []
    assert export.default_output(str(gguf_file), "q4_0") == out.with_name(out.name.replace(".f16.", ".q4_0."))
    assert export.default_output("Qwen/Qwen2.5-0.5B", "q8_0").as_posix() == "Qwen2.5-0.5B.q8_0.gguf"  # a hub id


def test_export_never_overwrites_its_input(gguf_file, capsys):
    """--out naming the input would replace the file being read: one line, the input unchanged."""
    before = gguf_file.read_bytes()
    message = one_error(export.main, ["--checkpoint", str(gguf_file), "--gguf", "f16", "--out", str(gguf_file)], capsys)
    assert message == f"--out {gguf_file} is the --checkpoint file itself; name another file"
    assert gguf_file.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--out", ""], "--out is empty: name a file or folder"),
        (["--out=~no_such_user_here/x.gguf"], "--out ~no_such_user_here/x.gguf: Could not determine home directory"),
    ],
)
def test_export_out_mistakes_are_one_line(gguf_file, capsys, args, expected):
    """`--out ''` exported to the default file as if no --out were given; an unknown `~user` was a traceback."""
    assert one_error(export.main, ["--checkpoint", str(gguf_file), *args], capsys).startswith(expected)
    assert sorted(p.name for p in gguf_file.parent.iterdir()) == ["m.Q8_0.gguf"]
