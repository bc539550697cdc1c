"""`python -m minigrpo.export` given a run folder takes the checkpoint a resume would take: a step saved
again whose save was killed between its two renames (its new folder, .tmp-step_N), a newer checkpoint
proven broken passed over with a warning naming its bad file, and a newer one whose file cannot be read
a one-line error naming that file (it may be intact: no older checkpoint is used in its place)."""

from __future__ import annotations

import errno

import pytest
import torch

pytest.importorskip("gguf")  # the exports below write GGUF files (a test dependency; absent on bare GPU images)

from test_checkpoint_recovery import Killed, killed_after_the_first_rename, unreadable
from test_export_more import TRAINER_STATE, fake_run
from test_gguf_export import IDS, TOL, bpe_tokenizer, family_model, rel_err

from minigrpo import export
from minigrpo.checkpoint import find_resume_checkpoint, save_checkpoint
from minigrpo.models.loading import load_pretrained
from minigrpo.run_pick import run_folder_pick


def exported_from(out, model) -> float:
    """The relative error of the exported file's logits against `model`'s."""
    back, _ = load_pretrained(out)
    with torch.no_grad():
        return rel_err(back(IDS), model(IDS))


def test_a_step_saved_again_and_killed_between_its_renames_is_exported(tmp_path, monkeypatch, capsys):
    """step_000002 saved again (seed 3) and killed between the renames: checkpoints/ holds step_000001,
    .tmp-old-step_000002 and .tmp-step_000002. A resume continues from .tmp-step_000002; export took
    step_000001 (relative logit error 1.40 against the seed-3 model), now the seed-3 weights (< 0.002)."""
    tok = bpe_tokenizer()
    run = fake_run(tmp_path, {1: family_model("llama", seed=1), 2: family_model("llama", seed=2)}, tok)
    again = family_model("llama", seed=3)
    killed_after_the_first_rename(monkeypatch)
    with pytest.raises(Killed):
        save_checkpoint(run, 2, model=again, tokenizer=tok, trainer_state=TRAINER_STATE, keep_last=5)
    monkeypatch.undo()
    moved = run / "checkpoints" / ".tmp-step_000002"
    assert sorted(p.name for p in moved.parent.iterdir()) == [".tmp-old-step_000002", ".tmp-step_000002", "step_000001"]
    with pytest.warns(UserWarning):
        assert find_resume_checkpoint(run)[0] == moved
    out = export.main(["--checkpoint", str(run), "--gguf", "f16", "--out", str(tmp_path / "picked.gguf")])
    captured = capsys.readouterr()
    assert f"{run} is a run folder: exporting {moved}" in captured.out
    assert f"warning: step 2 was being saved again when its run stopped: using {moved}" in captured.err
    assert exported_from(out, again) < TOL["f16"]


def test_a_broken_newest_checkpoint_is_passed_over_with_a_warning_naming_it(tmp_path, capsys):
    """Its weights cut short: the checkpoint before it is exported, as before, and now a warning names
    the bad file (it was passed over in silence)."""
    tok = bpe_tokenizer()
    older = family_model("llama", seed=1)
    run = fake_run(tmp_path, {1: older, 2: family_model("llama", seed=2)}, tok)
    weights = run / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = export.main(["--checkpoint", str(run), "--gguf", "f16", "--out", str(tmp_path / "older.gguf")])
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipping")]
    assert len(warned) == 1 and str(weights) in warned[0]
    assert warned[0].endswith(f"; using {run / 'checkpoints' / 'step_000001'}")
    assert exported_from(out, older) < TOL["f16"]


@pytest.mark.parametrize("name", ["trainer_state/state.json", "config.json"])
def test_a_newest_checkpoint_that_cannot_be_read_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, name):
    """A read error (permission denied) says nothing about the checkpoint: export used step_000001 in its
    place without a word; now one `error:` line names the file, exit status 2, nothing written."""
    tok = bpe_tokenizer()
    run = fake_run(tmp_path, {1: family_model("llama", seed=1), 2: family_model("llama", seed=2)}, tok)
    newest = run / "checkpoints" / "step_000002"
    unreadable(monkeypatch, newest / name, errno.EACCES)
    with pytest.raises(SystemExit) as info:
        export.main(["--checkpoint", str(run), "--gguf", "f16", "--out", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"error: --checkpoint {run}: {newest / name} cannot be read (Permission denied), so its checkpoint {newest} "
        "may be intact and is not passed over for an older one"
    ), err
    assert not (tmp_path / "x.gguf").exists()


def test_a_checkpoint_removed_while_it_is_checked_is_picked_again(tmp_path, monkeypatch):
    """A run still training renames a step_N folder away (pruned, or a moved-aside step put in place) while
    the pick checks it: not a broken checkpoint (no warning) but a FileNotFoundError naming it, which
    errors.read_vanishing answers by picking again."""
    from minigrpo import run_pick

    tok = bpe_tokenizer()
    run = fake_run(tmp_path, {1: family_model("llama", seed=1), 2: family_model("llama", seed=2)}, tok)
    newest = run / "checkpoints" / "step_000002"
    real = run_pick.verify_as_step

    def pruned_first(path, step):
        if path == newest and newest.exists():
            newest.rename(newest.with_name(".tmp-rm-step_000002"))
        return real(path, step)

    monkeypatch.setattr(run_pick, "verify_as_step", pruned_first)
    with pytest.raises(FileNotFoundError) as info:
        run_folder_pick(run, "export")
    assert info.value.filename == str(newest)
    assert run_folder_pick(run, "export") == run / "checkpoints" / "step_000001"


@pytest.mark.parametrize("name", ["step_000002", ".tmp-step_000002", ".tmp-old-step_000002"])
def test_the_default_export_name_of_a_moved_aside_step_is_the_steps_own(tmp_path, name):
    """A hidden .tmp- file beside the checkpoints would be swept by the next save's clean-up (and the
    step, renamed back, would no longer find its run config): the name is step_N's, as for step_N."""
    (tmp_path / name).mkdir()
    assert export.default_output(str(tmp_path / name), "f16") == tmp_path.resolve() / "step_000002.f16.gguf"
