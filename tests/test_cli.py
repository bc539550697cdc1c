"""The command lines as a user meets them: every mistake is one `error:` line naming the bad key,
file, value or reward, with exit status 2 and no traceback, reported before any weights load, and
nothing of an earlier run is lost. Each case runs the real entry point in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers.cli import one_error_line, run_module, train_cli
from helpers.runs import run_config

from minigrpo.errors import UserError


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny model folder, its copy-task data, and a finished 2-step run with a checkpoint ('done')."""
    root = tmp_path_factory.mktemp("cli")
    cfg = run_config(root, run={"name": "done"}, train={"steps": 2}, checkpoint={"every": 1, "save_final": True})
    proc = train_cli(root, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def config(workspace: Path, name: str, **sections) -> dict:
    """The workspace's 2-step run named `name`, with `sections` updated."""
    sections = {"train": {"steps": 2}, **sections}
    sections["run"] = {**sections.get("run", {}), "name": name}
    return run_config(workspace, **sections)


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def broken_weights(workspace: Path) -> dict:
    """A model folder whose weights file is cut short: a check that ran after loading would fail on it."""
    folder = workspace / "broken_model"
    if not folder.exists():
        folder.mkdir()
        for f in (workspace / "model").iterdir():
            data = f.read_bytes()
            (folder / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    return {"name_or_path": str(folder)}


# ------------------------------------------------------------------------------------------------
# config files and arguments


@pytest.mark.parametrize(
    ("yaml_text", "args", "expected"),
    [
        ("", (), "is empty"),
        ("train:\n  lr: 1.0e-5\n  lr: 2.0e-5\n", (), "duplicate key 'lr'"),
        ("train:\n  lrr: 1.0e-5\n", (), "train.lrr"),
        ("train:\n  lr: fast\n", (), "train.lr"),
        ("grpo:\n  group_size: 1\n", (), "grpo.group_size"),
        ("train:\n  steps: 2\n", ("--set", "grpo.loss_typ=dapo"), "grpo.loss_typ"),
        ("train:\n  steps: 2\n", ("--bogus",), "--bogus"),
        # a field the synthetic task does not fill: was a KeyError traceback while the questions were drawn
        ("data:\n  synthetic:\n    question: 'What is {expression} in base {base}?'\n", (), "no field {base}"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path, yaml_text, args, expected):
    path = tmp_path / "x.yaml"
    path.write_text(yaml_text)
    message = one_error_line(run_module("minigrpo.train", "--config", str(path), *args, cwd=tmp_path))
    assert expected in message


def test_missing_config_file_is_named(tmp_path):
    message = one_error_line(run_module("minigrpo.train", "--config", "nope.yaml", cwd=tmp_path))
    assert "nope.yaml" in message


# ------------------------------------------------------------------------------------------------
# the run folder: new runs, resuming


def test_new_run_refuses_to_overwrite_a_run(workspace):
    before = (workspace / "runs" / "done" / "metrics.jsonl").read_text()
    message = one_error_line(train_cli(workspace, config(workspace, "done")))
    assert "--resume" in message and "done" in message
    assert (workspace / "runs" / "done" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("name", ["never_ran", "don"])  # no run at all; a misspelt run name
def test_resuming_nothing_is_an_error(workspace, name):
    message = one_error_line(train_cli(workspace, config(workspace, name), "--resume"))
    assert message.startswith("nothing to resume") and name in message
    assert not (workspace / "runs" / name / "metrics.jsonl").exists()


def test_resuming_a_run_without_checkpoint_keeps_its_metrics(workspace, tmp_path):
    run_dir = workspace / "runs" / "no_ckpt"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    message = one_error_line(train_cli(workspace, config(workspace, "no_ckpt"), "--resume"))
    assert "nothing to resume" in message
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "reward": 0.5}\n'


def test_a_new_run_over_a_run_without_checkpoint_says_how_to_start_again(workspace):
    """A run stopped before its first checkpoint can neither resume nor be overwritten: the message
    says so instead of advising a --resume that would find nothing."""
    run_dir = workspace / "runs" / "no_ckpt_new"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    message = one_error_line(train_cli(workspace, config(workspace, "no_ckpt_new")))
    assert message == (
        f"{run_dir} already holds a run without a checkpoint, so nothing to resume: delete the folder, or set "
        "another run.name"
    )
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "reward": 0.5}\n'


def test_resume_with_a_changed_setting_names_it(workspace):
    cfg = config(workspace, "done", train={"steps": 4, "lr": 0.5})  # more steps may change; lr may not
    message = one_error_line(train_cli(workspace, cfg, "--resume"))
    assert "train.lr" in message and "train.steps" not in message.split("differ")[0]


def test_resume_falls_back_past_a_truncated_checkpoint(workspace, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(workspace / "runs" / "done", runs / "done")
    weights = runs / "done" / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    cfg = config(workspace, "done", run={"output_dir": str(runs)}, train={"steps": 3}, checkpoint={"every": 1})
    proc = train_cli(tmp_path, cfg, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "model.safetensors" in warnings[0], proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_000001" in proc.stdout
    steps = [json.loads(line)["step"] for line in (runs / "done" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def _drop_first_tensor(path: Path) -> None:
    from minigrpo.models.safetensors_io import iter_tensors, save_file

    tensors = dict(iter_tensors(path))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, path)


def _grow_norm(path: Path) -> None:
    import torch

    from minigrpo.models.safetensors_io import iter_tensors, save_file

    tensors = dict(iter_tensors(path))
    tensors["model.norm.weight"] = torch.ones(tensors["model.norm.weight"].numel() + 1)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("file_name", "spoil", "named"),
    [
        ("model.safetensors", _drop_first_tensor, "is missing from the checkpoint"),  # intact header, a tensor short
        ("model.safetensors", _grow_norm, "shape mismatch for 'model.norm.weight'"),
        ("run_config.yaml", lambda p: p.write_text("a: [1"), "run_config.yaml: not valid YAML: expected ','"),
    ],
)
def test_resume_skips_a_checkpoint_whose_files_the_model_cannot_take(workspace, tmp_path, file_name, spoil, named):
    """Weights whose names or shapes differ from the checkpoint's config.json are found from the
    headers while looking for a checkpoint (skipped, with a warning naming the tensor), not by
    load_weights after the policy loaded; a broken run_config.yaml is named with its line."""
    runs = tmp_path / "runs"
    shutil.copytree(workspace / "runs" / "done", runs / "done")
    spoil(runs / "done" / "checkpoints" / "step_000002" / file_name)
    cfg = config(workspace, "done", run={"output_dir": str(runs)}, train={"steps": 3}, checkpoint={"every": 1})
    proc = train_cli(tmp_path, cfg, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and named in warnings[0] and "step_000001" in warnings[0], proc.stderr[-3000:]


def test_resume_of_a_run_saved_before_a_setting_existed(workspace, tmp_path):
    """A checkpoint's run_config.yaml written before a setting existed lacks it: left at its default
    the run resumes; set to something else it is named as a change."""
    from minigrpo.build import check_run_dir
    from minigrpo.config import load_config

    runs = tmp_path / "runs"
    shutil.copytree(workspace / "runs" / "done", runs / "done")
    saved_file = runs / "done" / "checkpoints" / "step_000002" / "run_config.yaml"
    saved = yaml.safe_load(saved_file.read_text())
    del saved["sampler"]["min_p"], saved["dpo"]  # a field and a whole section added later
    saved_file.write_text(yaml.safe_dump(saved))
    cfg = config(workspace, "done", run={"output_dir": str(runs)}, train={"steps": 3})
    assert check_run_dir(load_config(write(tmp_path, cfg), ["run.resume=true"])).path == saved_file.parent
    changed = load_config(write(tmp_path, cfg), ["run.resume=true", "sampler.min_p=0.1"])
    with pytest.raises(UserError, match=r"^--resume with a changed config: sampler\.min_p differs from "):
        check_run_dir(changed)


def test_resume_with_nothing_left_to_run(workspace):
    """A complete run (steps 2, checkpoint at 2, nothing else to write) is one error line."""
    message = one_error_line(train_cli(workspace, config(workspace, "done"), "--resume"))  # steps 2, done at 2
    ckpt = workspace / "runs" / "done" / "checkpoints" / "step_000002"
    assert message == (
        f"{workspace / 'runs' / 'done'} is complete: its checkpoint {ckpt} is at train.steps=2, so there is nothing "
        "to run; raise train.steps to continue the run"
    )


def test_unwritable_output_folder_is_reported_before_loading(workspace, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = config(workspace, "x", run={"output_dir": str(blocker)}, model=broken_weights(workspace))
    message = one_error_line(train_cli(tmp_path, cfg))
    assert str(blocker) in message


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml"])
def test_a_folder_where_the_run_writes_a_file(workspace, name):
    run_dir = workspace / "runs" / f"blocked_{name.split('.')[0]}"
    shutil.copytree(workspace / "runs" / "done", run_dir)
    (run_dir / name).unlink()
    (run_dir / name).mkdir()
    cfg = config(workspace, run_dir.name, train={"steps": 3})
    message = one_error_line(train_cli(workspace, cfg, "--resume"))
    assert message == f"{run_dir / name} is not a file: the run writes its {name} there; move it away"


@pytest.mark.parametrize("name", ["merged", "model"])
def test_a_file_where_the_run_writes_its_final_folder(workspace, name):
    """A file of the user's named like a final output folder was deleted when the run wrote that folder."""
    run_dir = workspace / "runs" / f"file_{name}"
    run_dir.mkdir(parents=True)
    (run_dir / name).write_text("mine")
    message = one_error_line(train_cli(workspace, config(workspace, run_dir.name)))
    assert message == f"{run_dir / name} is not a folder: the run writes its {name} folder there; move it away"
    assert (run_dir / name).read_text() == "mine"


# ------------------------------------------------------------------------------------------------
# data and rewards: checked before any weights load (the model folder's weights are broken)


def test_missing_data_file(workspace, tmp_path):
    cfg = config(workspace, "x", model=broken_weights(workspace), data={"path": str(tmp_path / "gone.jsonl")})
    assert "gone.jsonl" in one_error_line(train_cli(tmp_path, cfg))


def test_data_file_not_utf8(workspace, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"question": "caf\u00e9", "answer": "1"}, ensure_ascii=False).encode("latin-1") + b"\n")
    cfg = config(workspace, "x", model=broken_weights(workspace), data={"path": str(bad)})
    assert "latin1.jsonl" in one_error_line(train_cli(tmp_path, cfg))


def test_data_file_with_a_broken_line(workspace, tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"question": "repeat 1", "answer": "1"}\n{"question": "repeat 2", \n')
    cfg = config(workspace, "x", model=broken_weights(workspace), data={"path": str(bad)})
    message = one_error_line(train_cli(tmp_path, cfg))
    assert "broken.jsonl" in message and "2" in message


@pytest.mark.parametrize(
    ("rewards", "expected"),
    [
        ([{"name": "exact_answer"}, {"name": "exact_answer"}], "exact_answer"),
        ([{"name": "exact_answer", "kwargs": {"length_penalty": 1.0}}], "length_penalty"),
        ([{"name": "no_such_module:reward"}], "no_such_module"),
        ([{"name": "correctnes"}], "correctnes"),
    ],
)
def test_reward_mistakes(workspace, tmp_path, rewards, expected):
    cfg = config(workspace, "x", model=broken_weights(workspace), rewards=rewards)
    assert expected in one_error_line(train_cli(tmp_path, cfg))


def test_hub_dataset_out_of_reach(workspace, tmp_path):
    data = {"source": "hub", "path": "nobody/no-such-dataset", "eval_split": None}
    cfg = config(workspace, "x", model=broken_weights(workspace), data=data)
    proc = run_module(
        "minigrpo.train", "--config", str(write(tmp_path, cfg)), cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}
    )
    assert "nobody/no-such-dataset" in one_error_line(proc)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_a_missing_optional_package_is_named(workspace, tmp_path):
    cfg = config(workspace, "x", model=broken_weights(workspace), sampler={"kind": "vllm"})
    message = one_error_line(train_cli(tmp_path, cfg))
    assert "sampler.kind=vllm" in message and "vllm" in message


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_logging_backend_that_is_not_installed_is_named_before_loading(workspace, tmp_path, backend):
    """log.tensorboard / log.wandb without the package: one line before the (broken) weights are read,
    not a warning after minutes of loading and a run that logs nowhere."""
    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed here")
    cfg = config(workspace, "x", model=broken_weights(workspace), log={backend: True})
    message = one_error_line(train_cli(tmp_path, cfg))
    assert message.startswith(f"log.{backend}=true needs the package {backend}, which is not installed"), message


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_an_8bit_optimizer_on_the_cpu_is_named(workspace, tmp_path):
    """bitsandbytes' 8-bit AdamW steps CUDA tensors only: said before loading, not by the optimizer after."""
    cfg = config(workspace, "x", model=broken_weights(workspace), train={"steps": 2, "optimizer": "adamw8bit"})
    message = one_error_line(train_cli(tmp_path, cfg))
    assert "train.optimizer=adamw8bit needs CUDA" in message and "run.device=cpu" in message


def test_broken_weights_are_named(workspace, tmp_path):
    cfg = config(workspace, "x", model=broken_weights(workspace))
    assert "broken_model" in one_error_line(train_cli(tmp_path, cfg))


def test_a_reward_that_scores_nothing_is_reported(workspace, tmp_path):
    cfg = config(workspace, "nan", rewards=[{"name": "exact_answer"}, {"name": "helpers.odd_rewards:all_nan"}])
    cfg["train"]["steps"] = 1
    proc = train_cli(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "helpers.odd_rewards:all_nan" in proc.stdout + proc.stderr
    assert "scored no row" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------
# python -m minigrpo.eval


def eval_cli(workspace: Path, *args: str):
    return run_module("minigrpo.eval", *args, cwd=workspace)


def test_eval_mistakes_are_one_line(workspace):
    ckpt = str(workspace / "runs" / "done" / "checkpoints" / "step_000002")
    cases = [
        (("--checkpoint", ckpt), "data.eval_split"),  # the run has no eval split: say so
        (("--checkpoint", ckpt, "--split", "train", "--num", "0"), "--num"),
        (("--checkpoint", ckpt, "--split", "train", "--num", "-3"), "--num"),
        (("--checkpoint", ckpt, "--split", "valid"), "valid"),
        (("--checkpoint", str(workspace / "runs" / "done")), "done"),  # a run folder, not a checkpoint
        (("--checkpoint", ckpt, "--split", "train", "--output", str(workspace / "no" / "x.json")), "no"),
        (("--checkpoint", ckpt, "--split", "train", "--output", str(workspace)), "is a folder"),
        # the eval split of a single training file would be the training rows: refused
        (("--checkpoint", ckpt, "--set", "data.eval_split=test"), "data.eval_path"),
        (("--checkpoint", ckpt, "--split", "train", "--set", "rewards=[{name: nope_mod:f}]"), "nope_mod"),
    ]
    for args, expected in cases:
        assert expected in one_error_line(eval_cli(workspace, *args)), args


@pytest.mark.parametrize("module, flag", [("eval", "--output"), ("export", "--out")])
def test_an_output_below_a_file_names_the_file(tmp_path, module, flag):
    from minigrpo.errors import UserError

    check_output = importlib.import_module(f"minigrpo.{module}").check_output
    blocker = tmp_path / "results.txt"
    blocker.write_text("")
    for out, problem in (
        (blocker / "x.json", f"{blocker} is a file, not a folder"),
        (blocker / "sub" / "x.json", f"{blocker} is a file, not a folder"),
        (tmp_path / "missing" / "x.json", f"the folder {tmp_path / 'missing'} does not exist"),
    ):
        with pytest.raises(UserError) as e:
            check_output(str(out) if module == "eval" else out)
        assert str(e.value) == f"{flag} {out}: {problem}"


def test_an_unwritable_eval_output_names_the_argument(tmp_path, monkeypatch):
    """A folder the results cannot be written to: the message names --output and the results, not
    checkpoints (check_writable's wording for a training run)."""
    from minigrpo import checkpoint, eval
    from minigrpo.errors import UserError

    monkeypatch.setattr(checkpoint, "write_probe_error", lambda folder: "Read-only file system")
    out = tmp_path / "r.json"
    with pytest.raises(UserError) as e:
        eval.check_output(str(out))
    assert str(e.value) == f"--output {out}: cannot write the results to {tmp_path}: Read-only file system"


def test_eval_model_folder_without_tokenizer(workspace, tmp_path):
    folder = tmp_path / "weights_only"
    folder.mkdir()
    for f in (workspace / "model").iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(config(workspace, "e")))
    args = ("--checkpoint", str(folder), "--config", str(cfg_path), "--split", "train", "--num", "2")
    assert "weights_only" in one_error_line(eval_cli(workspace, *args))


def test_eval_of_a_broken_lora_adapter_is_one_line(workspace, tmp_path):
    """A LoRA checkpoint folder that is no plain LoRA adapter, or lacks its weights: named before any weights load."""
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(config(workspace, "e", model=broken_weights(workspace))))
    for name, extra, expected in (("dora", {"use_dora": True}, "use_dora=True"), ("bare", {}, "is missing")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **extra}))
        args = ("--checkpoint", str(folder), "--config", str(cfg_path), "--split", "train")
        message = one_error_line(eval_cli(workspace, *args))
        assert expected in message and name in message, message


def test_eval_runs_on_the_named_split(workspace, tmp_path):
    ckpt = str(workspace / "runs" / "done" / "checkpoints" / "step_000002")
    out = tmp_path / "r.json"
    proc = eval_cli(workspace, "--checkpoint", ckpt, "--split", "train", "--num", "4", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'train' split" in proc.stdout
    results = json.loads(out.read_text())  # the file says what was evaluated, as the console line does
    assert results["num_examples"] == 4 and results["split"] == "train" and results["samples_per_prompt"] == 1
    assert results["temperature"] == 0


def split_folder_config(tmp_path: Path, num_test: int, **sections) -> Path:
    """A config on tmp_path's tiny model whose data folder has train.jsonl and a test.jsonl of `num_test` rows."""
    cfg = run_config(tmp_path, **sections)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tmp_path / "train.jsonl", data / "train.jsonl")
    rows = [{"question": f"repeat {i % 10}", "answer": str(i % 10)} for i in range(num_test)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg["data"] = {**cfg["data"], "path": str(data), "eval_split": "test", "num_eval": 3}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_eval_num_is_the_number_of_rows_scored(tmp_path):
    """--num above data.num_eval used to be cut to data.num_eval, and --num above the split's rows to
    what there was, both reported as if the asked number had been scored. The results file is strict
    JSON: a reward that scores no row is null, not NaN (which JSON readers refuse)."""
    cfg = split_folder_config(tmp_path, 10, rewards=[{"name": "exact_answer"}, {"name": "helpers.odd_rewards:all_nan"}])
    out = tmp_path / "r.json"
    args = ("--checkpoint", str(tmp_path / "model"), "--config", str(cfg), "--output", str(out))
    proc = eval_cli(tmp_path, *args, "--num", "7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'test' split (7 examples" in proc.stdout

    def no_constant(name: str):
        raise AssertionError(f"{name} in the results file")

    results = json.loads(out.read_text(), parse_constant=no_constant)
    assert results["num_examples"] == 7 and results["reward/helpers.odd_rewards:all_nan"] is None
    assert results["samples"][0]["prompt"] == "repeat 0"
    message = one_error_line(eval_cli(tmp_path, *args, "--num", "11"))
    assert message == "--num 11: the 'test' split holds only 10 examples"


def test_eval_sampling_does_not_depend_on_the_batch_size(tmp_path):
    """eval.temperature > 0: an example's completion used to depend on which batch (and which row of
    it) held it, so --batch-size changed the samples and the accuracy; now (run.seed, its index) picks it."""
    from minigrpo.eval import main as evaluate

    cfg = split_folder_config(tmp_path, 6, sampler={"max_new_tokens": 3}, eval={"temperature": 1.0})
    args = ["--checkpoint", str(tmp_path / "model"), "--config", str(cfg), "--num", "5"]

    def completions(*extra: str) -> list[str]:
        return [s["completion"] for s in evaluate([*args, *extra])["samples"]]

    whole = completions("--batch-size", "5")
    assert completions("--batch-size", "1") == whole and completions("--batch-size", "2") == whole
    assert completions("--batch-size", "5") == whole  # and again: the same draws
    assert completions("--set", "run.seed=1") != whole  # the seed does pick them


def test_an_override_into_a_section_the_file_gives_as_a_list_is_one_line(tmp_path):
    """`grpo: [4, 8]` in the file and `--set grpo.group_size=4`: was a TypeError traceback; the file is named."""
    path = tmp_path / "x.yaml"
    path.write_text("grpo: [4, 8]\n")
    proc = run_module("minigrpo.train", "--config", str(path), "--set", "grpo.group_size=4", cwd=tmp_path)
    assert one_error_line(proc) == f"{path}: grpo: expected mapping (GRPOCfg), got [4, 8]"


def test_ctrl_c_in_an_entry_point_is_one_line_with_status_130(capsys, tmp_path):
    """Ctrl-C during export or eval printed a KeyboardInterrupt traceback: run_cli makes it one
    `interrupted` line and exit status 130 (128 + SIGINT); training keeps its own line, naming the
    checkpoint to continue from, with nothing added."""
    from types import SimpleNamespace

    from minigrpo.bookkeeping import until_interrupted
    from minigrpo.errors import run_cli

    def interrupted(argv):
        raise KeyboardInterrupt

    try:
        with pytest.raises(SystemExit) as e:
            run_cli(interrupted, [])
    except KeyboardInterrupt:  # escaping, it would stop pytest itself
        pytest.fail("Ctrl-C went through run_cli")
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"

    cfg = SimpleNamespace(run=SimpleNamespace(run_dir=tmp_path / "fresh"))
    with pytest.raises(SystemExit) as e:
        run_cli(lambda argv: until_interrupted(interrupted, cfg), [])
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted: no step finished: start the run again\n"


def test_sigint_to_an_export_is_one_line(tmp_path):
    """The real signal, in a `python -m minigrpo.export`-like subprocess that receives SIGINT while its
    command line is read: one `interrupted` line, exit status 130, no traceback."""
    import subprocess
    import sys

    from helpers.cli import cli_env

    code = (
        "import os, signal\n"
        "from minigrpo import export\n"
        "export.parse_args = lambda argv: os.kill(os.getpid(), signal.SIGINT)\n"
        "export.main(['--checkpoint', 'x'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr == "interrupted\n"
