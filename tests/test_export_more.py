"""`python -m minigrpo.export` on the inputs a user gives it beyond one checkpoint folder: a run folder (its
newest intact checkpoint), an `--out` meant as a folder; general.name of a dotted model name; Q4_K blocks
whose values all sit on one quantization level (a narrow, all-positive sub-block)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize
from test_gguf_export import IDS, TOL, bpe_tokenizer, family_model, rel_err

from minigrpo import export
from minigrpo.checkpoint import save_checkpoint
from minigrpo.models import kquants
from minigrpo.models.loading import load_pretrained

TRAINER_STATE = {"optimizer": {}, "scheduler": {}, "data": {"epoch": 0, "index": 0}}  # what a resume checks


def fake_run(root, models: dict[int, torch.nn.Module], tok):
    """A run folder holding one training checkpoint per step of `models` (and a metrics.jsonl)."""
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    for step, model in models.items():
        save_checkpoint(run, step, model=model, tokenizer=tok, trainer_state=TRAINER_STATE, keep_last=5)
    return run


def test_q4_k_sub_blocks_on_one_level_keep_their_values():
    """A sub-block whose 32 values round to one level (all positive, within 1/15 of their maximum) has no
    least-squares line through (q, x); the fit returned scale 0 and the block dequantized to zeros (relative
    error 1.0 for a constant 0.3 row and for values in [0.300, 0.301]). The scale alone is fitted now: errors
    3e-4 and 1.2e-3 (bound 0.005), read back by the gguf package's dequantizer."""
    rng = np.random.default_rng(0)
    rows = {
        "constant": np.full((2, 256), 0.3, np.float32),
        "narrow": rng.uniform(0.300, 0.301, (2, 256)).astype(np.float32),
    }
    for what, x in rows.items():
        back = dequantize(kquants.quantize_q4_k(x), QT.Q4_K).reshape(x.shape)
        err = np.linalg.norm(back - x) / np.linalg.norm(x)
        assert err < 0.005, (what, err)


def test_a_run_folder_exports_its_newest_intact_checkpoint(tmp_path, capsys):
    """`--checkpoint runs/x` (or runs/x/checkpoints), as `python -m minigrpo.eval` takes it: the newest
    checkpoint whose files check out is exported, next to it; it was an error ("no config.json in runs/x")."""
    tok = bpe_tokenizer()
    older, newer = family_model("llama", seed=1), family_model("llama", seed=2)
    run = fake_run(tmp_path, {1: older, 2: newer}, tok)
    newest = run / "checkpoints" / "step_000002"
    for folder in (run, run / "checkpoints"):
        out = export.main(["--checkpoint", str(folder), "--gguf", "f16"])
        assert out == newest.with_name("step_000002.f16.gguf")
        assert f"{folder} is a run folder: exporting {newest}" in capsys.readouterr().out
        back, _ = load_pretrained(out)
        with torch.no_grad():
            assert rel_err(back(IDS), newer(IDS)) < TOL["f16"]

    weights = newest / "model.safetensors"  # a copy cut short: the checkpoint before it is exported
    weights.write_bytes(weights.read_bytes()[:1000])
    out = export.main(["--checkpoint", str(run), "--gguf", "f16", "--out", str(tmp_path / "older.gguf")])
    back, _ = load_pretrained(out)
    with torch.no_grad():
        assert rel_err(back(IDS), older(IDS)) < TOL["f16"]


def test_a_run_folder_with_nothing_to_export_is_one_line(tmp_path, capsys):
    tok = bpe_tokenizer()
    run = fake_run(tmp_path, {1: family_model("llama")}, tok)
    weights = run / "checkpoints" / "step_000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text("{}\n")
    cases = [(run, "a run folder whose checkpoints are all broken"), (bare, "a run folder with nothing to export")]
    for folder, expected in cases:
        with pytest.raises(SystemExit) as info:
            export.main(["--checkpoint", str(folder)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: --checkpoint {folder}: {expected}"), err
    assert not list(tmp_path.rglob("*.gguf"))


def test_general_name_keeps_the_dots_of_a_model_name(tmp_path):
    """general.name was the file name cut at its first dot: `Qwen2.5-0.5B-grpo.q4_k_m.gguf` -> "Qwen2"."""
    tok = bpe_tokenizer()
    model = family_model("qwen2")
    for file, name in (("Qwen2.5-0.5B-grpo.q4_0.gguf", "Qwen2.5-0.5B-grpo"), ("step_000020.gguf", "step_000020")):
        path = export.save_gguf(model, tok, tmp_path / file, "q4_0")
        assert GGUFReader(str(path)).get_field("general.name").contents() == name


def test_an_out_meant_as_a_folder_is_refused(tmp_path, tok_dir, capsys, monkeypatch):
    """`--out exports/` where exports/ does not exist yet wrote a file named `exports`."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        export.main(["--checkpoint", str(tok_dir), "--out", "exports/"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert re.fullmatch(r"error: --out exports/ names a folder; name a file, e\.g\. exports/model\.gguf\n", err), err
    assert not (tmp_path / "exports").exists()


@pytest.fixture
def tok_dir(tmp_path):
    from minigrpo.models.loading import save_pretrained

    return save_pretrained(family_model("llama"), bpe_tokenizer(), tmp_path / "model")


def prune(folder) -> None:
    """Delete a checkpoint folder as a run still training prunes it: renamed aside, then removed."""
    import os
    import shutil

    aside = folder.with_name(f".tmp-rm-{folder.name}")
    os.rename(folder, aside)
    shutil.rmtree(aside)


def vanish_after_pick(monkeypatch, times: int) -> list:
    """The run folder's pick is pruned right after it is picked, its first `times` picks; returns them."""
    from minigrpo import eval as evaluation
    from minigrpo import run_folder

    real, removed = run_folder.run_folder_pick, []

    def pick(folder, action):
        picked = real(folder, action)
        if picked is not None and len(removed) < times:
            removed.append(picked)
            prune(picked)
        return picked

    for module in (run_folder, evaluation):  # export imports it when it runs, eval when it is imported
        monkeypatch.setattr(module, "run_folder_pick", pick)
    return removed


def vanish_when_read(monkeypatch, times: int) -> list:
    """Each checkpoint folder is pruned as its weights are about to be read (the pick's checks or the
    load), its first `times` reads; returns the folders removed."""
    from minigrpo.models import loading

    real, removed = loading._hf_tensor_source, []

    def reading(directory):
        if len(removed) < times and directory.name.startswith("step_"):
            removed.append(directory)
            prune(directory)
        return real(directory)

    monkeypatch.setattr(loading, "_hf_tensor_source", reading)
    return removed


@pytest.mark.parametrize("vanish", [vanish_after_pick, vanish_when_read])
def test_a_checkpoint_a_training_run_deletes_while_it_is_read_is_picked_again(vanish, tmp_path, monkeypatch, capsys):
    """A run training with checkpoint.keep_last=1 deletes the checkpoint export picked a moment later: it
    died with a FileNotFoundError traceback; the run folder's newest intact checkpoint now is exported."""
    tok = bpe_tokenizer()
    older = family_model("llama", seed=1)
    run = fake_run(tmp_path, {1: older, 2: family_model("llama", seed=2)}, tok)
    removed = vanish(monkeypatch, 1)
    out = export.main(["--checkpoint", str(run), "--gguf", "f16"])
    assert removed == [run / "checkpoints" / "step_000002"]
    assert out == run / "checkpoints" / "step_000001.f16.gguf"
    assert f"{run} is a run folder: exporting {run / 'checkpoints' / 'step_000001'}" in capsys.readouterr().out
    back, _ = load_pretrained(out)
    with torch.no_grad():
        assert rel_err(back(IDS), older(IDS)) < TOL["f16"]


@pytest.mark.parametrize(
    ("vanish", "given"), [(vanish_after_pick, "run"), (vanish_when_read, "run"), (vanish_when_read, "checkpoint")]
)
def test_a_checkpoint_that_keeps_vanishing_is_one_line(vanish, given, tmp_path, monkeypatch, capsys):
    """Every checkpoint picked deleted while read (3 picks), or a checkpoint folder given itself deleted:
    one `error:` line naming the folder and checkpoint.keep_last, exit status 2, no traceback."""
    tok = bpe_tokenizer()
    run = fake_run(tmp_path, {step: family_model("llama", seed=step) for step in (1, 2, 3, 4)}, tok)
    folder = run if given == "run" else run / "checkpoints" / "step_000002"
    removed = vanish(monkeypatch, 4)
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(folder), "--gguf", "f16"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "checkpoint.keep_last" in err
    assert len(removed) == (3 if given == "run" else 1)
    assert str(folder) in err and ("3 times" in err) == (given == "run")


def test_ctrl_c_during_an_export_is_one_line_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the tensors are written printed a KeyboardInterrupt traceback; it is one `interrupted`
    line and exit status 130 (as training), and neither the output nor its temporary file is left."""
    from minigrpo.models.loading import save_pretrained

    save_pretrained(family_model("llama"), bpe_tokenizer(), tmp_path / "ckpt")
    real, calls = export.encode_tensor, []

    def interrupted_third_tensor(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(export, "encode_tensor", interrupted_third_tensor)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    try:
        with pytest.raises(SystemExit) as e:
            export.main(["--checkpoint", str(tmp_path / "ckpt"), "--gguf", "f16", "--out", str(out)])
    except KeyboardInterrupt:  # escaping, it would stop pytest itself
        pytest.fail("Ctrl-C went through the export's command line")
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    assert list(out.parent.iterdir()) == []
