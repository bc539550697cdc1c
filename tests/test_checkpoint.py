"""Training checkpoints: exact round trips without pickle, a full disk, broken files, read-only folders."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny import tiny_model

from minigrpo import atomic, checkpoint
from minigrpo.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    check_writable,
    find_resume_checkpoint,
    load_optimizer_state,
    load_trainer_state,
    optimizer_state,
    restore_rng,
    rng_state,
    save_checkpoint,
    save_trainer_state,
    set_rng_state,
    verify_checkpoint,
)
from minigrpo.errors import UserError
from minigrpo.models import safetensors_io
from minigrpo.models.safetensors_io import read_header, save_file
from minigrpo.tensor_tree import flatten, unflatten

REPO = Path(__file__).resolve().parents[1]


def assert_same_tree(a, b, path="state"):
    """Equal structure, types, values; tensors and arrays bitwise with their dtypes and shapes."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"
        raw = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(raw(a), raw(b)), f"{path}: tensor bytes differ"
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{path}: array bytes differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
        if isinstance(a, float):
            assert math.copysign(1, a) == math.copysign(1, b), f"{path}: sign of zero lost"


def odd_tree() -> dict:
    nan_payload = torch.from_numpy(np.array([0x7FC00001, 0xFF800000, 0x80000000], dtype=np.uint32).view(np.float32))
    wide = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    return {
        "step": 7,
        "floats": [0.1, -0.0, float("inf"), float("nan"), 1e-310, 2.0**60],
        "big_int": 2**70,
        "flags": (True, False, None),
        "text": "é/ünï",
        "int_keys": {0: {"exp_avg": torch.randn(3, 2)}, 5: "five"},
        "odd_keys": {"__tensor__": 1, (1, "a"): [2], None: 3.5, True: "t"},
        "nested": {"a/b": torch.ones(1), "a": {"b": torch.zeros(1)}},  # the same path key twice
        "tensors": [
            nan_payload,  # NaN payloads and -0.0 kept bit for bit
            torch.randn(5, 3).to(torch.bfloat16),
            torch.tensor(3, dtype=torch.int64),  # 0-dim (AdamW's step)
            torch.empty(0, 4),
            torch.tensor([True, False, True]),
            torch.arange(256, dtype=torch.uint8),
            torch.from_numpy(np.array([0, 1, 2**32 - 1], dtype=np.uint32)),
            torch.randn(4).to(torch.float8_e4m3fn),
            wide[:, ::2],  # not contiguous
        ],
        "arrays": (np.arange(624, dtype=np.uint32), np.linspace(0, 1, 6).reshape(2, 3), np.array([], dtype=np.int16)),
        "empty": [{}, [], ()],
    }


def test_tree_round_trip_is_exact_through_files(tmp_path):
    tree = odd_tree()
    save_trainer_state(tmp_path, tree)
    assert sorted(p.name for p in (tmp_path / "trainer_state").iterdir()) == ["state.json", "tensors.safetensors"]
    loaded = load_trainer_state(tmp_path)
    assert_same_tree(tree, loaded)
    assert loaded["arrays"][0].flags.writeable  # a restored numpy RNG state can be used like the saved one


def test_tree_rejects_what_it_cannot_store():
    with pytest.raises(TypeError, match=r"cannot store set at 'a/0'"):
        flatten({"a": [{1, 2}]})
    manifest, _ = flatten({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="names tensor 'w'"):
        unflatten(manifest, {})


def test_rng_states_round_trip_and_restore_each_ranks_stream(tmp_path):
    states = []
    for seed in (11, 22):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        states.append(rng_state())
    expected = (random.random(), float(np.random.rand()), torch.rand(3))  # rank 1's next draws
    save_trainer_state(tmp_path, {"step": 3, "rng": states[0], "rng_per_rank": states})
    state = load_trainer_state(tmp_path)
    assert isinstance(state["rng_per_rank"][1]["python"], tuple)  # random.setstate needs tuples
    torch.manual_seed(0)
    random.seed(0)
    assert not restore_rng(state, 0, 3)  # written by 2 ranks: the caller reseeds
    assert restore_rng(state, 1, 2)
    assert (random.random(), float(np.random.rand())) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
    set_rng_state(state["rng"])
    random.seed(11)
    assert state["rng"]["python"] == random.getstate()


def _trained(seed: int = 0):
    """A tiny model and AdamW after one step (non-zero moments)."""
    model = tiny_model(seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    model(torch.randint(0, 128, (2, 5))).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_optimizer_state_resumes_to_the_same_next_step(tmp_path):
    model, opt = _trained()
    save_trainer_state(tmp_path, {"step": 1, "optimizer": optimizer_state(model, opt)})
    twin = tiny_model(seed=0).train()
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=5.0)
    load_optimizer_state(twin, twin_opt, load_trainer_state(tmp_path)["optimizer"])
    assert twin_opt.param_groups[0]["betas"] == (0.9, 0.95) and twin_opt.param_groups[0]["lr"] == 1e-2
    ids = torch.randint(0, 128, (2, 5))
    for m, o in ((model, opt), (twin, twin_opt)):
        m(ids).float().pow(2).mean().backward()
        o.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), f"{name} differs after the resumed step"


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        (  # a checkpoint of another model: its optimizer state is for other parameters
            lambda state: state.update(optimizer=optimizer_state(*_trained_other())),
            r"cannot restore its optimizer state \(ValueError: the checkpoint's optimizer state is for other ",
        ),
        (lambda state: state.update(scheduler={}), r"cannot restore its learning-rate schedule \(KeyError"),
        (
            lambda state: state.update(rng_per_rank=[{"torch": 1, "python": 2, "numpy": 3}]),
            r"cannot restore its RNG states \(TypeError",
        ),
    ],
    ids=["foreign_optimizer", "empty_schedule", "bad_rng"],
)
def test_a_trainer_state_the_run_cannot_take_is_one_line_naming_state_json(tmp_path, spoil, named):
    """What verify_checkpoint cannot judge without the model (whose parameters the optimizer state is
    for) fails as the run restores it: a CheckpointError naming state.json, not a traceback."""
    from types import SimpleNamespace

    from minigrpo.build import ResumePoint, restore_trainer_state
    from minigrpo.data import Example, PromptLoader
    from minigrpo.grad_scale import GradScale

    model, opt = _trained()
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loader = PromptLoader([Example(prompt=f"p{i}", answer=str(i)) for i in range(4)], seed=0)
    world = SimpleNamespace(rank=0, size=1)
    run = SimpleNamespace(model=model, optimizer=opt, scheduler=scheduler, loader=loader, world=world)
    run.cfg, run.grad_scale = SimpleNamespace(run=SimpleNamespace(seed=0)), GradScale()
    state = {"optimizer": optimizer_state(model, opt), "scheduler": scheduler.state_dict(), "data": loader.state_dict()}
    state |= {"step": 1, "rng": rng_state(), "rng_per_rank": [rng_state()]}
    restore_trainer_state(run, ResumePoint(tmp_path / "step_000001", state))  # intact: restores
    assert run.start_step == 1
    spoil(state)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/step_000001/trainer_state/state\.json: {named}"):
        restore_trainer_state(run, ResumePoint(tmp_path / "step_000001", state))


def _trained_other():
    """A model of another width (the same parameter names, other shapes) and AdamW after one step."""
    model = tiny_model(seed=1, hidden_size=32, intermediate_size=48)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 128, (2, 5))).float().pow(2).mean().backward()
    opt.step()
    return model, opt


def test_a_resumed_optimizer_steps_the_way_this_process_does(tmp_path):
    """A state saved by a fused AdamW (a CUDA run) resumes into a foreach one (this CPU process) with
    the same next step; the saved group's implementation flags do not override the live ones."""
    model = tiny_model(seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.randint(0, 128, (2, 5))).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    twin = tiny_model(seed=0).train()
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=5.0, foreach=True)
    save_trainer_state(tmp_path, {"step": 1, "optimizer": optimizer_state(model, opt)})
    load_optimizer_state(twin, twin_opt, load_trainer_state(tmp_path)["optimizer"])
    assert twin_opt.param_groups[0]["foreach"] and not twin_opt.param_groups[0]["fused"]
    ids = torch.randint(0, 128, (2, 5))
    for m, o in ((model, opt), (twin, twin_opt)):
        m(ids).float().pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert (a - b).abs().max() < 1e-6  # fused and foreach round apart (measured 7e-7 at most)


def test_a_resumed_master_weights_optimizer_follows_its_schedule(tmp_path):
    """bf16 parameters with fp32 masters: after load_optimizer_state the LR schedule still sets the
    learning rate the masters step with (loading must not detach the schedule's param groups)."""
    from minigrpo.config import TrainCfg
    from minigrpo.optim import MasterWeights, build_optimizer, build_scheduler

    cfg = TrainCfg(lr=1e-2, warmup_steps=2, schedule="cosine")
    model = tiny_model(seed=0).to(torch.bfloat16)
    opt = build_optimizer(model.parameters(), cfg)
    assert isinstance(opt, MasterWeights)
    scheduler = build_scheduler(opt, cfg, total_steps=6)  # as build_run: the schedule first, then the state
    save_trainer_state(tmp_path, {"step": 0, "optimizer": optimizer_state(model, opt)})
    load_optimizer_state(model, opt, load_trainer_state(tmp_path)["optimizer"])
    lrs = []
    for _ in range(3):
        opt.step()  # no gradients: nothing moves
        scheduler.step()
        lrs.append(opt.inner.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-2 * 0.5 * (1 + math.cos(math.pi / 4))])  # warmup, then cosine


# an optimizer state as optimizer_state() writes it, for a model with nothing trainable
NO_OPTIMIZER_STATE = {"format": "by_name", "param_names": [], "param_groups": [], "group_sizes": [], "state": {}}


def _save(
    run_dir, step, *, model=None, keep_last=5, save_model=checkpoint.save_pretrained, run_config=None, **state_changes
):
    """Checkpoint `step` as the trainer writes it; state_changes replace (or, set to ..., drop) trainer state keys."""
    model = model or tiny_model(seed=step)
    state = {
        "optimizer": NO_OPTIMIZER_STATE,
        "scheduler": {"last_epoch": step, "base_lrs": [1e-2]},
        "data": {"epoch": 0, "index": 4 * step},
        "world_size": 1,
    }
    state.update(state_changes)
    return save_checkpoint(
        run_dir,
        step,
        model=model,
        tokenizer=None,
        trainer_state={k: v for k, v in state.items() if v is not ...},
        keep_last=keep_last,
        run_config=run_config or {"train": {"lr": 0.01}},
        save_model=save_model,
        rng_states=None,
    )


def test_save_checkpoint_writes_no_pickle_and_keeps_the_last_n(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_000001").mkdir(parents=True)  # left by a killed writer
    for step in (2, 4, 6):
        path = _save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    assert not list(path.rglob("*.pt")) and not list(path.rglob("*.bin"))
    assert [p.name for p in path.glob("*.safetensors")] == ["model.safetensors"]  # weights only, for other tools
    assert (path / "run_config.yaml").read_text() == "train:\n  lr: 0.01\n"
    state = verify_checkpoint(path)
    assert state["step"] == 6 and state["world_size"] == 1 and state["data"] == {"epoch": 0, "index": 24}
    assert len(state["rng_per_rank"]) == 1 and torch.equal(state["rng"]["torch"], state["rng_per_rank"][0]["torch"])
    readable = json.loads((path / "trainer_state" / "state.json").read_text())
    assert (readable["step"], readable["state"]["data"]["index"]) == (6, 24)
    found, resumed = find_resume_checkpoint(tmp_path)
    assert found == path and resumed["scheduler"] == {"last_epoch": 6, "base_lrs": [1e-2]}
    _save(tmp_path, 6, keep_last=2)  # a step saved twice (a resumed run) replaces it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004", "step_000006"]


# ------------------------------------------------------------------------------------------------
# never unpickled


class _Exploit:
    """Unpickling this creates a folder: proof that the file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _plant_pickle(path: Path, marker: Path) -> None:
    (path / "trainer_state.pt").write_bytes(pickle.dumps({"step": 4, "optimizer": _Exploit(marker)}))


def test_the_crafted_pickle_runs_code_when_unpickled(tmp_path):
    """The exploit used below is real: unpickling it creates the marker (so the next tests can fail)."""
    _plant_pickle(tmp_path, tmp_path / "pwned")
    pickle.loads((tmp_path / "trainer_state.pt").read_bytes())
    assert (tmp_path / "pwned").is_dir()


def test_an_old_pickled_trainer_state_is_refused_never_unpickled(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    old = run / "checkpoints" / "step_000004"
    old.mkdir(parents=True)
    checkpoint.save_pretrained(tiny_model(), None, old)
    _plant_pickle(old, marker)
    (old / "trainer_state.json").write_text(json.dumps({"step": 4, "data": {"epoch": 0, "index": 8}}))  # as of old
    with pytest.raises(CheckpointError, match=r"step_000004/trainer_state\.pt: .*pickle, which is never loaded"):
        load_trainer_state(old)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*trainer_state\.pt"):
        find_resume_checkpoint(run)
    (old / "trainer_state.json").unlink()  # the pickle alone: refused the same way
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: .*never loaded"):
        load_trainer_state(old)
    assert not marker.exists()


def test_a_pickle_beside_a_new_checkpoint_is_ignored(tmp_path):
    marker = tmp_path / "pwned"
    path = _save(tmp_path / "run", 2)
    _plant_pickle(path, marker)
    found, state = find_resume_checkpoint(tmp_path / "run")
    assert found == path and state["step"] == 2 and state["optimizer"] == NO_OPTIMIZER_STATE
    assert not marker.exists()


def test_no_module_unpickles():
    """Every file minigrpo reads is safetensors, JSON, YAML, GGUF or text: no torch.load, no pickle."""
    offenders = []
    for path in sorted((REPO / "minigrpo").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for needle in ("torch.load(", "import pickle", "pickle.load", "weights_only=False", "np.load("):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert offenders == []


# ------------------------------------------------------------------------------------------------
# a full disk


class _FillsUp:
    """A file whose writes fail with ENOSPC once `room` bytes are written (as a full disk does)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            self.f.write(memoryview(data).cast("B")[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _disk_fills_up_in(monkeypatch, file_name: str, room: int = 64) -> None:
    """safetensors_io's writer hits a full disk while writing `file_name` (or its temporary name)."""

    def fake_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115  (closed by the caller's `with`)
        return _FillsUp(f, room) if file_name in Path(path).name and "w" in mode else f

    monkeypatch.setattr(safetensors_io, "open", fake_open, raising=False)


def test_the_writer_reports_a_full_disk_with_the_file(tmp_path, monkeypatch):
    _disk_fills_up_in(monkeypatch, "x.safetensors")
    with pytest.raises(OSError) as info:
        save_file({"w": torch.ones(1000)}, tmp_path / "x.safetensors")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "x.safetensors")


@pytest.mark.parametrize("file_name", ["model.safetensors", "tensors.safetensors"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_nothing_behind(tmp_path, monkeypatch, file_name):
    previous = _save(tmp_path, 2)
    _disk_fills_up_in(monkeypatch, file_name)
    with pytest.raises(CheckpointError, match=r"^no space left on device: .*checkpoints/step_000004") as info:
        _save(tmp_path, 4, keep_last=1)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]  # no .tmp-* folder
    assert verify_checkpoint(previous)["step"] == 2
    monkeypatch.undo()
    _save(tmp_path, 4, keep_last=1)  # space again: the next save works and prunes as usual
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004"]


def test_a_full_disk_names_the_checkpoint_that_is_kept(tmp_path, monkeypatch):
    """The one line says what a resume continues from: the previous checkpoint, or that there is none."""
    _disk_fills_up_in(monkeypatch, "model.safetensors")
    with pytest.raises(CheckpointError, match=r"\(step 2 not saved; no earlier checkpoint to resume from\)$"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    previous = _save(tmp_path, 2)
    _disk_fills_up_in(monkeypatch, "tensors.safetensors")
    with pytest.raises(CheckpointError) as info:
        _save(tmp_path, 4)
    assert str(info.value) == (
        f"no space left on device: {tmp_path / 'checkpoints' / 'step_000004'} "
        f"(step 4 not saved; the previous checkpoint {previous} is kept)"
    )


def test_a_failed_save_of_another_kind_also_cleans_up(tmp_path):
    def broken_writer(model, tokenizer, directory):
        (directory / "model.safetensors").write_bytes(b"12345678")
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        _save(tmp_path, 2, save_model=broken_writer)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_every_file_and_folder_of_a_checkpoint_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    """A file's entry lives in its folder: trainer_state/ must reach the disk too, or a power loss
    after the rename (and the pruning of older checkpoints) can leave the newest one without its state."""
    synced = []
    monkeypatch.setattr(checkpoint, "fsync_file", lambda path: synced.append(Path(path)))
    monkeypatch.setattr(checkpoint, "fsync_dir", lambda path: synced.append(Path(path)))
    final = _save(tmp_path, 2)
    tmp = final.with_name(".tmp-" + final.name)
    written = {tmp / p.relative_to(final) for p in final.rglob("*")} | {tmp}
    assert written <= set(synced), sorted(map(str, written - set(synced)))


# ------------------------------------------------------------------------------------------------
# a folder that cannot be written


def test_check_writable_accepts_a_folder_still_to_be_made(tmp_path):
    target = tmp_path / "runs" / "a" / "checkpoints"
    check_writable(target)
    assert not (tmp_path / "runs").exists()  # a check, not a mkdir
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_check_writable_names_a_file_in_the_way(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(CheckpointError, match=rf"cannot write checkpoints to {tmp_path}/runs/a: .* is not a folder"):
        check_writable(tmp_path / "runs" / "a")


def test_check_writable_names_a_read_only_folder(tmp_path, monkeypatch):
    """Root ignores permission bits, so the denial is simulated (os.access, then the probe file)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(checkpoint.os, "access", lambda p, mode: Path(p) != folder and real_access(p, mode))
    with pytest.raises(CheckpointError, match=rf"cannot write checkpoints to {folder}/ckpt: {folder} is not writable"):
        check_writable(folder / "ckpt")
    monkeypatch.setattr(checkpoint.os, "access", real_access)

    def read_only_mount(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only_mount)
    with pytest.raises(CheckpointError, match=rf"cannot write checkpoints to {folder}: Read-only file system"):
        check_writable(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 555")
def test_check_writable_on_a_chmod_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match=rf"{folder} is not writable"):
            check_writable(folder / "checkpoints")
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------------------
# broken files: resume from the newest intact checkpoint


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def test_no_checkpoint_is_none(tmp_path):
    assert find_resume_checkpoint(tmp_path / "never-ran") is None
    (tmp_path / "checkpoints").mkdir()
    assert find_resume_checkpoint(tmp_path) is None


@pytest.mark.parametrize(
    "file_name", ["trainer_state/tensors.safetensors", "trainer_state/state.json", "model.safetensors", "config.json"]
)
def test_a_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, file_name):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    _truncate(newest / file_name)
    with pytest.warns(CheckpointWarning, match=rf"step_000004/{file_name}.*resuming from .*step_000002"):
        found, state = find_resume_checkpoint(tmp_path)
    assert found.name == "step_000002" and state["step"] == 2 and state["data"]["index"] == 8


def test_truncated_at_a_tensor_boundary_or_padded_is_caught(tmp_path):
    newest = _save(tmp_path, 4)
    weights = newest / "model.safetensors"
    header = read_header(weights)
    first_end = min(end for _, end in (info["data_offsets"] for info in header.values()))
    intact = weights.read_bytes()
    _truncate(weights, keep=first_end)  # whole tensors only: the header promises more
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* truncated or corrupt"):
        verify_checkpoint(newest)
    weights.write_bytes(intact + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the header describes .* holds"):
        verify_checkpoint(newest)


def _save_adapter(model, tokenizer, directory):
    """What a LoRA run's checkpoint holds: a rank-2 PEFT adapter (config and A, B weights)."""
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    weights = {"base_model.model.x.lora_A.weight": torch.randn(2, 8)}
    weights["base_model.model.x.lora_B.weight"] = torch.zeros(8, 2)
    save_file(weights, directory / "adapter_model.safetensors")


def test_a_truncated_adapter_is_caught(tmp_path):
    _save(tmp_path, 2, save_model=_save_adapter)
    newest = _save(tmp_path, 4, save_model=_save_adapter)
    assert verify_checkpoint(newest)["step"] == 4
    _truncate(newest / "adapter_model.safetensors", keep=-3)
    with pytest.warns(CheckpointWarning, match=r"step_000004/adapter_model\.safetensors"):
        found, _ = find_resume_checkpoint(tmp_path)
    assert found.name == "step_000002"


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        (lambda d: (d / "adapter_config.json").write_text("{}"), r"adapter_config\.json: peft_type=None"),
        (lambda d: (d / "adapter_config.json").unlink(), r"adapter_config\.json: not a readable adapter config"),
        (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}'), r"lora_alpha=None"),
        (  # the config's rank is not the weights' rank
            lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}'),
            r"adapter_model\.safetensors: base_model\.model\.x\.lora_A\.weight has shape \[2, 8\], not that of a "
            r"rank-4 adapter",
        ),
        (
            lambda d: save_file({"x.weight": torch.ones(2, 2)}, d / "adapter_model.safetensors"),
            r"adapter_model\.safetensors: unexpected tensor 'x\.weight'",
        ),
    ],
    ids=["config_empty", "config_missing", "no_alpha", "rank_mismatch", "not_lora_weights"],
)
def test_a_broken_adapter_config_falls_back_before_any_weights_load(tmp_path, spoil, named):
    """A LoRA checkpoint whose adapter load_peft_adapter would refuse is skipped like a truncated file:
    the resume takes the older intact checkpoint instead of failing after the base model loaded."""
    _save(tmp_path, 2, save_model=_save_adapter)
    newest = _save(tmp_path, 4, save_model=_save_adapter)
    assert verify_checkpoint(newest)["step"] == 4
    spoil(newest)
    with pytest.raises(CheckpointError, match=named):
        verify_checkpoint(newest)
    with pytest.warns(CheckpointWarning, match=rf"step_000004/.*{named}.*resuming from .*step_000002"):
        found, _ = find_resume_checkpoint(tmp_path)
    assert found.name == "step_000002"


def test_every_checkpoint_broken_names_the_newest_bad_file(tmp_path):
    for step in (2, 4):
        _truncate(_save(tmp_path, step) / "trainer_state" / "state.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not warnings
        newest_bad = r"no intact checkpoint .*step_000004/trainer_state/state\.json"
        with pytest.raises(CheckpointError, match=newest_bad) as info:
            find_resume_checkpoint(tmp_path)
    assert isinstance(info.value, UserError)


def test_a_checkpoint_missing_its_trainer_state_or_weights_is_skipped(tmp_path):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    (newest / "trainer_state" / "tensors.safetensors").unlink()
    with pytest.warns(CheckpointWarning, match=r"step_000004/trainer_state/tensors\.safetensors is missing"):
        assert find_resume_checkpoint(tmp_path)[0].name == "step_000002"
    newest = _save(tmp_path, 4)
    (newest / "model.safetensors").unlink()
    with pytest.warns(CheckpointWarning, match=r"step_000004 holds no weights"):
        assert find_resume_checkpoint(tmp_path)[0].name == "step_000002"


def test_a_checkpoint_whose_run_config_was_deleted_is_skipped(tmp_path):
    """A resume compares the run's config with run_config.yaml: a newest checkpoint that lost the file
    would let a changed config through unchecked, so it counts as broken (state.json records the file)."""
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    assert json.loads((newest / "trainer_state" / "state.json").read_text())["run_config"] == "run_config.yaml"
    (newest / "run_config.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"step_000004/run_config\.yaml is missing") as info:
        verify_checkpoint(newest)
    assert "\n" not in str(info.value)
    with pytest.warns(CheckpointWarning, match=r"step_000004/run_config\.yaml is missing.*resuming from .*step_000002"):
        assert find_resume_checkpoint(tmp_path)[0].name == "step_000002"


def test_a_checkpoint_saved_without_a_run_config_needs_none(tmp_path):
    path = save_checkpoint(
        tmp_path, 3, model=tiny_model(), tokenizer=None, keep_last=2, run_config=None,
        trainer_state={"optimizer": NO_OPTIMIZER_STATE, "scheduler": {}, "data": {"epoch": 0, "index": 3}},
    )  # fmt: skip
    assert "run_config" not in json.loads((path / "trainer_state" / "state.json").read_text())
    assert verify_checkpoint(path)["step"] == 3


def test_a_resume_with_a_changed_config_is_refused_after_the_newest_run_config_was_deleted(tmp_path):
    """Through check_run_dir, as --resume runs it: train.lr changed and the newest checkpoint's
    run_config.yaml gone; the change is named from the previous checkpoint's file (before: the resume
    went on from step 4 with the new learning rate, nothing said)."""
    from minigrpo.build import check_run_dir
    from minigrpo.config import Config

    cfg = Config()
    cfg.run.output_dir, cfg.run.name, cfg.train.steps = str(tmp_path), "run", 10
    run_dir = cfg.run.run_dir
    for step in (2, 4):
        _save(run_dir, step, run_config=cfg.to_dict())
    (run_dir / "checkpoints" / "step_000004" / "run_config.yaml").unlink()
    cfg.run.resume, cfg.train.lr = True, cfg.train.lr * 2
    with (
        pytest.warns(CheckpointWarning, match=r"step_000004/run_config\.yaml is missing"),
        pytest.raises(UserError, match=r"^--resume with a changed config: train\.lr differs from .*step_000002"),
    ):
        check_run_dir(cfg)


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize("keep_last, kept", [(1, ["step_000003"]), (2, ["step_000002", "step_000003"])])
def test_a_save_after_falling_back_removes_the_abandoned_newer_checkpoints(tmp_path, keep_last, kept):
    """Resumed from step 2 because step 4 is broken: saving step 3 drops step 4 (a timeline never
    resumed from again) and keeps the newest `keep_last` of the rest, the new step 3 among them."""
    _save(tmp_path, 2, keep_last=2)
    _truncate(_save(tmp_path, 4, keep_last=2) / "model.safetensors")
    with pytest.warns(CheckpointWarning, match=r"step_000004/model\.safetensors"):
        assert find_resume_checkpoint(tmp_path)[0].name == "step_000002"
    _save(tmp_path, 3, keep_last=keep_last)
    assert _names(tmp_path) == kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing broken is left to skip
        found, state = find_resume_checkpoint(tmp_path)
    assert found.name == "step_000003" and state["data"]["index"] == 12
    _save(tmp_path, 5, keep_last=2)
    assert _names(tmp_path) == ["step_000003", "step_000005"]


def test_a_run_killed_while_pruning_never_resumes_from_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Step 4 is broken only in its (optional) run_config.yaml, so the run went on from step 2. Saving
    step 3 deletes step 4; killed after that deletion removed run_config.yaml, step 4 must not be
    left as a folder that now passes every check (a resume would go back to the abandoned timeline)."""
    _save(tmp_path, 2)
    (_save(tmp_path, 4) / "run_config.yaml").write_text("- not a mapping\n")
    rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        if "step_000004" in str(path) and Path(path).is_dir():
            (Path(path) / "run_config.yaml").unlink()
            raise KeyboardInterrupt  # the process dies here
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        assert find_resume_checkpoint(tmp_path)[0].name == "step_000003"
    _save(tmp_path, 5)  # the next save clears what the killed one left
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize(
    "text, reason",
    [("run: [unclosed", "not valid YAML"), ("", "not a YAML mapping"), ("- train\n- lr\n", "not a YAML mapping")],
)
def test_a_broken_run_config_falls_back_with_a_warning(tmp_path, text, reason):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    (newest / "run_config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=rf"step_000004/run_config\.yaml: {reason}") as info:
        verify_checkpoint(newest)
    assert "\n" not in str(info.value)
    with pytest.warns(CheckpointWarning, match=rf"step_000004/run_config\.yaml: {reason}.*resuming from .*step_000002"):
        found, state = find_resume_checkpoint(tmp_path)
    assert found.name == "step_000002" and state["step"] == 2


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"optimizer": ...}, "has no 'optimizer'"),
        ({"scheduler": ...}, "has no 'scheduler'"),
        ({"data": ...}, "has no 'data'"),
        ({"data": [0, 8]}, "'data' is a list, not a dict"),
        ({"optimizer": "adamw"}, "'optimizer' is a str, not a dict"),
        ({"data": {"epoch": 0}}, "data cursor has no integer 'index'"),
        ({"optimizer": {**NO_OPTIMIZER_STATE, "param_names": None}}, "optimizer has no 'param_names'"),
    ],
)
def test_a_trainer_state_without_what_a_resume_restores_falls_back(tmp_path, changes, problem):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4, **changes)
    assert load_trainer_state(newest)["step"] == 4  # it parses: only what it holds is wrong
    with pytest.raises(CheckpointError, match=rf"step_000004/trainer_state/state\.json: .*{re.escape(problem)}"):
        verify_checkpoint(newest)
    with pytest.warns(CheckpointWarning, match=rf"step_000004/trainer_state/state\.json: .*{re.escape(problem)}"):
        found, state = find_resume_checkpoint(tmp_path)
    assert found.name == "step_000002" and state["data"] == {"epoch": 0, "index": 8}


def test_a_tensor_under_the_key_the_safetensors_header_reserves_round_trips(tmp_path):
    """A top-level "__metadata__" tensor was stored under that name, which the safetensors header
    keeps for its own entry: the file was written, then read back as corrupt at the resume."""
    tree = {"__metadata__": torch.arange(3.0), "__metadata__#0": torch.ones(2), "w": torch.zeros(1)}
    manifest, tensors = flatten(tree)
    assert "__metadata__" not in tensors and len(tensors) == 3
    save_file(tensors, tmp_path / "t.safetensors")
    loaded = unflatten(manifest, dict(safetensors_io.iter_tensors(tmp_path / "t.safetensors")))
    assert_same_tree(tree, loaded)


def test_a_key_like_a_renamed_path_keeps_every_tensor(tmp_path):
    """The path "a/b" twice (a key and a nested path) renamed the second "a/b#2": a tensor stored under
    that very key was overwritten, and both leaves came back as the same tensor."""
    tree = {"a/b": torch.zeros(1), "a/b#2": torch.ones(1), "a": {"b": torch.full((1,), 2.0)}}
    manifest, tensors = flatten(tree)
    assert len(tensors) == 3
    save_file(tensors, tmp_path / "t.safetensors")
    loaded = unflatten(manifest, dict(safetensors_io.iter_tensors(tmp_path / "t.safetensors")))
    assert_same_tree(tree, loaded)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (torch.eye(3).to_sparse(), r"cannot store a torch.sparse_coo cpu tensor at 'opt/0'"),
        (torch.empty(2, device="meta"), r"cannot store a torch.strided meta tensor at 'opt/0'"),
        (np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), r"cannot store a numpy array of dtype .+ at 'opt/0'"),
    ],
)
def test_what_the_tree_cannot_hold_is_one_line_naming_its_path(value, named):
    """Sparse and meta tensors failed inside the writer with a message naming nothing; a structured
    numpy array came back as raw bytes of dtype V12, its fields lost."""
    with pytest.raises(TypeError, match=rf"^{named}$"):
        flatten({"opt": [value]})
