"""The run folder: what a new run must not overwrite, what --resume continues from, and the final
outputs a run writes once its last step is done.

    with run_dir_held(cfg):                           # no other process runs in the folder meanwhile
        resume = check_run_dir(cfg, resumable)        # None: a new run; else the checkpoint to continue from
        finish_run(cfg, resume, folders, write)       # --resume of a run at its last step: the missing outputs
    write_folder_whole(run_dir / "model", write)      # a final model folder: whole or not at all

A run killed after its final checkpoint but before its final outputs (SFT's model, a LoRA run's merged
export, the last curves) is completed by `--resume`: the outputs that are missing are written from the
final checkpoint, and a run that lacks nothing says in one line that it is complete. The final
folders are written under a temporary name and renamed into place, so their presence means complete.

One process at a time runs in a run folder: it holds an exclusive lock on run_dir/.lock (which names
its pid) from before the first check until it ends, and a second process started on the same folder
is one line naming that pid. The operating system drops the lock of a process that dies, so a killed
run leaves nothing that stops its --resume (the stale file is taken over). The lock file is no output
of the run: nothing compares, copies or checks it.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigrpo.atomic import write_folder_whole as write_folder_whole  # re-exported for the entry points
from minigrpo.checkpoint import check_writable, find_resume_checkpoint, latest_checkpoint
from minigrpo.config import Config, ConfigError, release_derived
from minigrpo.configio import changed_keys, parse_yaml
from minigrpo.errors import UserError
from minigrpo.run_pick import RUN_OUTPUTS as RUN_OUTPUTS  # re-exported for the entry points
from minigrpo.run_pick import half_written
from minigrpo.run_pick import run_folder_pick as run_folder_pick  # re-exported for the entry points

# what a resumed run may change: where the run lives and runs, its length, logging and checkpointing;
# any other change is refused (the saved config is the one that runs)
RESUMABLE_CHANGES = (
    "run.resume",
    "run.name",
    "run.output_dir",
    "run.device",
    "train.steps",
    "log.",
    "checkpoint.",
    "eval.",
    "distributed.timeout_s",
    "sft",  # read only by python -m minigrpo.sft (a run saved before the section existed lacks it)
)

# what changes how much memory a step takes, not what it computes (up to float rounding), so that a run
# which no longer fits may lower it on resume, as the memory pre-flight suggests (memory.py's knobs);
# train.micro_batch_size too where the loss does not count micro-batches (not bnpo)
MEMORY_SETTINGS = (
    "model.gradient_checkpointing",
    "model.activation_offload",
    "sampler.max_rows",
    "sampler.compile",
    "sampler.merge_lora",
    "sampler.vllm_sleep",
    "sampler.gpu_memory_utilization",
    "distributed.strategy",
    "distributed.reshard_after_forward",
)


def resumable_changes(cfg: Config) -> tuple[str, ...]:
    """The keys a resumed GRPO run may change (check_run_dir's `resumable`): RESUMABLE_CHANGES, the
    memory settings, and the settings this run does not read (unread_settings)."""
    micro_batches = ("train.micro_batch_size",) if cfg.grpo.loss_type != "bnpo" else ()
    return (*RESUMABLE_CHANGES, *MEMORY_SETTINGS, *micro_batches, *unread_settings(cfg))


def unread_settings(cfg: Config) -> tuple[str, ...]:
    """The keys a run with `cfg` never reads, because of another setting (config_rules.unread_keys: another
    algorithm's section, LoRA's settings with LoRA off, the synthetic task with another data source, the
    vLLM sampler's settings with the own sampler, IS bounds without IS correction, ...). Changing one
    changes nothing the resumed run computes; the setting that makes it unread is itself compared."""
    from minigrpo.config_rules import unread_keys

    return unread_keys(cfg)


# the files a run writes in its folder (minigrpo/metrics.py, bookkeeping.py)
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "config.yaml", "curves.png")


@dataclass
class ResumePoint:
    """The checkpoint a resumed run continues from, with its trainer state."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        """The step the checkpoint was written after."""
        return int(self.state["step"])


def check_run_dir(cfg: Config, resumable: tuple[str, ...] = RESUMABLE_CHANGES) -> ResumePoint | None:
    """The run folder's state against run.resume, and the checkpoint to resume from (None: a new run).
    A resumed run may change only the keys that start with one of `resumable`."""
    check_run_dir_path(cfg)
    run_dir = cfg.run.run_dir
    for name in RUN_FILES:  # what the logger appends to or rewrites: a folder there fails only after loading
        if (run_dir / name).exists() and not (run_dir / name).is_file():
            raise UserError(f"{run_dir / name} is not a file: the run writes its {name} there; move it away")
    for name in RUN_OUTPUTS:  # a final output folder replaces what is there: not a file of the user's
        if (run_dir / name).exists() and not (run_dir / name).is_dir():
            raise UserError(f"{run_dir / name} is not a folder: the run writes its {name} folder there; move it away")
    if not cfg.run.resume:
        if latest_checkpoint(run_dir) is not None:
            raise UserError(f"{run_dir} already holds a run: continue it with --resume, or set another run.name")
        if (run_dir / "metrics.jsonl").exists():  # --resume would find nothing to continue from
            raise UserError(
                f"{run_dir} already holds a run without a checkpoint, so nothing to resume: delete the folder, or set "
                "another run.name"
            )
        check_writable_run_dir(run_dir)
        return None
    found = find_resume_checkpoint(run_dir)
    if found is None:
        what = f"holds no checkpoint{half_written(run_dir)}" if run_dir.is_dir() else "does not exist"
        raise UserError(f"nothing to resume: {run_dir} {what} (check run.name and run.output_dir)")
    path, state = found
    if cfg.train.steps < int(state["step"]):  # equal: the run is done, its final outputs may be missing
        raise UserError(
            f"--resume from {path}: train.steps={cfg.train.steps} is before its step {state['step']}, so there is "
            "nothing to run (a run does not go back); raise train.steps to continue the run"
        )
    saved_file = path / "run_config.yaml"
    if saved_file.is_file():
        try:  # read as the config was (YAML 1.2 numbers), so "1e-5" in kwargs compares as it was saved
            saved = parse_yaml(saved_file.read_text(encoding="utf-8")) or {}
        except ConfigError as e:
            raise ConfigError(f"{saved_file}: {e}") from None
        current = cfg.to_dict()
        saved = with_new_defaults(saved, current, Config().to_dict())  # algorithm, dpo, ppo, any new key
        check_compute_dtype(cfg, path, saved, state)
        changed = [k for k in settings_changed(saved, current) if not k.startswith(resumable)]
        if changed:
            verb = "differs" if len(changed) == 1 else "differ"
            values = "; ".join(f"{key}: {value_at(saved, key)} there, {value_at(current, key)} now" for key in changed)
            unread = unread_settings(cfg)
            may = ", ".join(k for k in resumable if k != "run.resume" and k not in unread)
            raise UserError(
                f"--resume with a changed config: {', '.join(changed)} {verb} from {saved_file} ({values}); a resumed "
                f"run keeps its settings (only {may} and the settings it does not read may change): revert them or "
                "start a new run"
            )
    check_writable_run_dir(run_dir)
    return ResumePoint(path, state)


def check_compute_dtype(cfg: Config, path: Path, saved: dict[str, Any], state: dict[str, Any]) -> None:
    """A resumed run computes in its checkpoint's dtype (config_rules.resumed_dtype_error names a change,
    such as auto on another device); then run.dtype counts as unchanged in `saved` (set in place): auto
    and the dtype it meant, written by name, are the same setting."""
    from minigrpo.config_rules import resumed_dtype_error, saved_compute_dtype

    saved_run, device = saved.get("run") if isinstance(saved.get("run"), dict) else {}, cfg.run.device
    if saved_compute_dtype(saved_run, state) is None:  # unknown: run.dtype is compared as it is written
        return
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device.split(":")[0]
    error = resumed_dtype_error(saved_run, state, cfg.run, device_type)
    if error is not None:
        raise UserError(f"--resume from {path}: {error}")
    saved_run["dtype"] = cfg.run.dtype


def settings_changed(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose settings differ between a checkpoint's run config and the resumed run's, as the
    user changed them: a derived value (`spec(..., derived=...)`) that follows its sources counts as
    unset on both sides, so that a changed sampler.max_new_tokens is that one change, not also an
    env.max_episode_tokens nobody set (or that a run saved before the field existed lacks); with env.kind
    null in both, nothing reads the env section (a saved config may lack it), so none of it is a change."""
    saved, current = copy.deepcopy(saved), copy.deepcopy(current)
    for raw in (saved, current):
        release_derived(raw)  # in place; a config this package no longer reads is compared as it is
    changed = changed_keys(saved, current)
    if env_kind(saved) is None and env_kind(current) is None:
        changed = [k for k in changed if k != "env" and not k.startswith("env.")]
    return changed


_MISSING = object()  # value_at's answer for a key a config tree lacks


def value_at(tree: Any, key: str, width: int = 200) -> str:
    """The value under dotted `key` (`rewards.0.weight`) of a plain config tree for a message (strings
    quoted, `null`, `true`), shortened to `width` characters; `unset` where the tree lacks the key."""
    for part in key.split("."):
        if isinstance(tree, dict):
            tree = tree.get(part, _MISSING)
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            tree = _MISSING
    if tree is _MISSING:
        return "unset"
    if isinstance(tree, list) and tree and all(isinstance(v, dict) and "name" in v for v in tree):
        tree = [v["name"] for v in tree]  # a list of reward functions: their names say which were added
    text = json.dumps(tree) if tree is None or isinstance(tree, bool) else repr(tree)  # null, true as YAML says
    return text if len(text) <= width else text[: width - 3] + "..."


def env_kind(raw: dict[str, Any]) -> Any:
    """env.kind of a plain config tree (None where the tree has no env section)."""
    env = raw.get("env")
    return env.get("kind") if isinstance(env, dict) else None


def with_new_defaults(saved: Any, current: Any, default: Any) -> Any:
    """A checkpoint's run config with every key it lacks (a setting added since it was written: a whole
    section such as dpo, or one field) taken from the current config where that holds the default: the
    run goes on as it ran; a key set away from its default still differs, and is named."""
    if not (isinstance(saved, dict) and isinstance(current, dict) and isinstance(default, dict)):
        return saved
    out = dict(saved)
    for key, value in current.items():
        if key in saved:
            out[key] = with_new_defaults(saved[key], value, default.get(key))
        elif key in default and value == default[key]:
            out[key] = value
    return out


def check_writable_run_dir(run_dir: Path) -> None:
    """The run folder itself (config.yaml, metrics.jsonl, the final outputs) and its checkpoints/ can
    be written: a folder made read-only would otherwise fail only once the weights have loaded."""
    check_writable(run_dir, "the run's files")
    check_writable(run_dir / "checkpoints")


NAME_MAX = 255  # bytes of one file or folder name where the file system does not say (ext4, xfs, btrfs, tmpfs)


def check_run_dir_path(cfg: Config) -> None:
    """run.output_dir / run.name is a path the file system can hold: a `~user` home that does not exist
    or a folder name longer than the file system takes would otherwise surface as a traceback from the
    first stat, so each is one UserError naming the key (run.name for the last folder, else run.output_dir)."""
    try:
        run_dir = cfg.run.run_dir
    except RuntimeError as e:  # Path.expanduser: no such user, or no home folder
        raise UserError(f"run.output_dir={cfg.run.output_dir!r}: {e} (write the folder out in full)") from None
    folder = Path(run_dir.anchor)
    limit = name_limit(folder, NAME_MAX)
    for i, part in enumerate(run_dir.parts[1:] if run_dir.anchor else run_dir.parts):
        size = len(os.fsencode(part))
        if size > limit:
            last = i == len(run_dir.parts) - (2 if run_dir.anchor else 1)
            key = "run.name" if last else "run.output_dir"
            raise UserError(
                f"{key}: the folder name {part[:40]!r}... is {size} bytes long, more than the {limit} the file "
                f"system takes for one name in {folder}: choose a shorter {key}"
            )
        folder = folder / part
        limit = name_limit(folder, limit)


def name_limit(folder: Path, default: int) -> int:
    """The longest file name (bytes) the file system of `folder` takes; `default` for a folder that does
    not exist (yet) or a system that does not say."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return default


# the settings of a model config.json that fix the shapes of its weights (ModelArgs' names)
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size")


def check_same_architecture(name_or_path: str | None, resume: ResumePoint | None) -> None:
    """A resumed full fine-tuning run's checkpoint holds the weights of the model folder it started
    from: a model.name_or_path folder that now holds another architecture is one line naming both
    config.json files, before any weights load. Nothing to compare for a hub id, a GGUF file or a
    LoRA checkpoint (its adapter has no config.json)."""
    if resume is None or name_or_path is None:
        return
    base_file = Path(name_or_path).expanduser() / "config.json"
    saved_file = resume.path / "config.json"
    if not (base_file.is_file() and saved_file.is_file()):
        return
    base, saved = (shapes_of(f) for f in (base_file, saved_file))
    differ = [f"{key} {saved[key]} vs {base[key]}" for key in SHAPE_FIELDS if saved[key] != base[key]]
    if differ:
        raise UserError(
            f"--resume from {resume.path}: its {saved_file} and model.name_or_path's {base_file} are different "
            f"architectures ({', '.join(differ)}): point model.name_or_path at the model the run started from"
        )


def shapes_of(config_file: Path) -> dict[str, Any]:
    """SHAPE_FIELDS of a model config.json."""
    from minigrpo.models.args import ModelArgs

    try:
        args = ModelArgs.from_hf_config(json.loads(config_file.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{config_file}: not a model config this package reads ({e})") from None
    return {key: getattr(args, key) for key in SHAPE_FIELDS}


# ================================================================================================
# one process per run folder

LOCK_FILE = ".lock"  # run_dir/.lock: the pid of the process running in the folder, locked while it runs


@dataclass
class RunDirLock:
    """An exclusive flock on run_dir/.lock (open as `fd`); `made` is the outermost folder its taking made."""

    run_dir: Path
    fd: int
    made: Path | None


@contextmanager
def run_dir_held(cfg: Config) -> Iterator[RunDirLock | None]:
    """cfg.run.run_dir held by this process while the block runs (lock_run_dir), released after it,
    and by the operating system if the process dies. Under torchrun rank 0 alone (the rank that
    writes) takes it: the other ranks write nothing and wait for rank 0 as in any run."""
    check_run_dir_path(cfg)  # every rank: a path no file system takes fails alike everywhere
    if os.environ.get("RANK", "0") != "0":
        yield None
        return
    lock = lock_run_dir(cfg.run.run_dir, resuming=cfg.run.resume)
    try:
        yield lock
    finally:
        if lock is not None:
            unlock_run_dir(lock)


def lock_run_dir(run_dir: Path, *, resuming: bool = False) -> RunDirLock | None:
    """Take the run folder for this process before anything is written or checked there (a new run's
    folder is made for it): a folder another process holds is one line naming that process's pid.
    None where no lock is taken: a folder --resume will not find, one that cannot be made or written
    (check_run_dir names why), a file system without locks (a warning)."""
    run_dir = Path(run_dir)
    if resuming and not run_dir.is_dir():
        return None
    for _ in range(10):  # a folder or lock file removed by the run that held it while this one opened it: again
        made = outermost_missing(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        if take_lock(fd, run_dir):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return RunDirLock(run_dir, fd, made)
        os.close(fd)
    return None


def take_lock(fd: int, run_dir: Path) -> bool:
    """Lock the open run_dir/.lock `fd` without waiting. True once it is locked and still the folder's
    lock file; False if that file was removed meanwhile (its holder ended: lock the new one). A lock
    held by another process is a UserError naming its pid."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "a process whose pid it has not written yet"
        raise UserError(
            f"{run_dir} is in use by another run ({who} holds {run_dir / LOCK_FILE}): wait for it to end, "
            "or set another run.name"
        ) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        warnings.warn(
            f"{run_dir}: the file system cannot lock {LOCK_FILE} ({e.strerror}), so a second run started "
            "in this folder is not refused",
            stacklevel=3,
        )
        return True
    try:
        held, named = os.fstat(fd), os.stat(run_dir / LOCK_FILE)
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    except FileNotFoundError:
        return False


def outermost_missing(folder: Path) -> Path | None:
    """The outermost of `folder` and its parents that does not exist (None: `folder` exists)."""
    missing = None
    while not folder.exists() and folder != folder.parent:
        missing, folder = folder, folder.parent
    return missing


def unlock_run_dir(lock: RunDirLock) -> None:
    """Remove the lock file, then drop the lock (in this order: a process that opened the old file
    finds it replaced and retries), and the folders its taking made if they stayed empty (a new run
    refused by a check leaves no empty run folder)."""
    with suppress(FileNotFoundError):
        os.unlink(lock.run_dir / LOCK_FILE)
    os.close(lock.fd)
    folder = lock.run_dir
    while lock.made is not None and folder.is_relative_to(lock.made):
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote there), or made again by another run
            break
        folder = folder.parent


# ================================================================================================
# the final outputs


def curves_stale(cfg: Config) -> bool:
    """Whether curves.png is configured (log.plots, matplotlib installed) but missing or older than
    metrics.jsonl: the curves of the last steps were never drawn."""
    from minigrpo.plot import matplotlib_available

    metrics, curves = cfg.run.run_dir / "metrics.jsonl", cfg.run.run_dir / "curves.png"
    if not (cfg.log.plots and metrics.is_file() and matplotlib_available()):
        return False
    return not curves.is_file() or curves.stat().st_mtime < metrics.stat().st_mtime


def missing_final_outputs(cfg: Config, folders: tuple[str, ...]) -> list[str]:
    """The final outputs of a run at its last step that its folder lacks: `folders` (model, merged)
    and stale curves."""
    run_dir = cfg.run.run_dir
    missing = [name for name in folders if not (run_dir / name).is_dir()]
    return missing + (["curves.png"] if curves_stale(cfg) else [])


def redraw_curves(cfg: Config, step: int) -> None:
    """curves.png from metrics.jsonl, as the logger draws it when it closes."""
    from minigrpo.metrics import MetricsLogger

    MetricsLogger(cfg.run.run_dir, total_steps=cfg.train.steps, start_step=step, progress=False).close()


def finish_run(
    cfg: Config, resume: ResumePoint, folders: tuple[str, ...], write: Callable[[list[str]], None]
) -> list[dict[str, Any]]:
    """--resume of a run whose checkpoint is at train.steps: nothing to train. A complete run is a
    one-line error (a resume was asked for, nothing is left to run); otherwise the missing final outputs
    are named and written: `write(names)` writes the `folders` among them (from the checkpoint's
    weights), the curves are redrawn here. Under torchrun rank 0 alone writes. Returns no step metrics
    (no step ran)."""
    run_dir, steps = cfg.run.run_dir, cfg.train.steps
    missing = missing_final_outputs(cfg, folders)
    if not missing:
        raise UserError(
            f"{run_dir} is complete: its checkpoint {resume.path} is at train.steps={steps}, so there is nothing "
            "to run; raise train.steps to continue the run"
        )
    if os.environ.get("RANK", "0") != "0":
        return []
    print(
        f"{run_dir} ran to train.steps={steps} ({resume.path}) but lacks final outputs: writing {', '.join(missing)}",
        flush=True,
    )
    if any(name in folders for name in missing):
        write([name for name in missing if name in folders])
    if "curves.png" in missing:
        redraw_curves(cfg, resume.step)
    return []
