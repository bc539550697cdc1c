"""Shared pieces of the benchmark scripts: environment record, in-run ceilings, result files."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: smoke runs only


KERNEL_KINDS = [  # (kind, kernel-name pattern), first match wins: profiles group GPU kernels by these
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|splitk"),
    ("attention", r"fmha|flash|attention|attn"),
    ("triton: " + "{name}", r"^_\w+_kernel"),
    ("index/copy", r"index|copy|scatter|gather|cat"),
    ("reduce", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
]


def kernel_kind(name: str) -> str:
    """The KERNEL_KINDS group of a GPU kernel's name ("other" where none matches)."""
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind.format(name=name.split("(")[0]) if "{name}" in kind else kind
    return "other"


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> int:
    """Reset the peak-memory counter; returns the bytes allocated now (0 on CPU)."""
    if DEVICE.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else 0


def environment() -> dict[str, Any]:
    """Device and versions, recorded in every result file."""
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    for package in ("transformers", "vllm", "trl", "liger-kernel"):  # read from metadata, never imported
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[package] = importlib.metadata.version(package)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count
        )
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


def device_slug(env: dict[str, Any]) -> str:
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]


def timings(fn, reps: int = 5) -> list[float]:
    """Wall seconds of `reps` calls of fn, each between CUDA synchronisations (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def cuda_ms(fn, reps: int = 5) -> float:
    """Median wall time of fn in ms, with CUDA synchronisation (one warm-up call)."""
    times = sorted(timings(fn, reps))
    return times[len(times) // 2] * 1e3


def copy_bandwidth_gbs(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth, bytes read + written, in GB/s."""
    n = int((gib if DEVICE.type == "cuda" else 0.0625) * 2**30) // 2
    src = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), reps=10)
    return 2 * n * 2 / (ms / 1e3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """bf16 n^3 matmul rate on random data, TFLOP/s."""
    n = n if DEVICE.type == "cuda" else 512
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    ms = cuda_ms(lambda: a @ b, reps=10)
    return 2 * n**3 / (ms / 1e3) / 1e12


def finite_json(value: Any) -> Any:
    """value with every NaN or infinite float (a failed reward's mean, a ratio over a zero time) made
    None, through dicts, lists and tuples: strict JSON has no NaN or Infinity, and other readers
    (jq, JavaScript, json.loads with parse_constant) refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def write_result(name: str, payload: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    """Write payload as <out_dir or results/>/<name>_<device>.json (smoke runs pass a temp out_dir), as
    strict JSON: a NaN or infinite number is written as null."""
    folder = RESULTS if out_dir is None else Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{device_slug(payload['environment'])}.json"
    text = json.dumps(finite_json(payload), indent=2, default=str, allow_nan=False)
    path.write_text(text + "\n")
    return path


def gpu_memory() -> dict[str, int | None]:
    """Allocated, reserved and free device bytes now (torch's counters and the driver's free
    memory, which also sees memory outside torch's caching allocator); None on the CPU."""
    if DEVICE.type != "cuda":
        return {"allocated": None, "reserved": None, "free": None, "total": None}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
        "free": free,
        "total": total,
    }


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max([len(c), *(len(_fmt(r.get(c))) for r in rows)]) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)


class NullTokenizer:
    """Benchmarks sample random-weight models: no text, padding id 0, no stop ids."""

    pad_token_id = 0
    stop_ids = ()

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""


# argparse types for the scripts' arguments: a bad value is one `error:` line naming the flag (through
# minigrpo.errors.ArgumentParser and run_cli), not a traceback or a run that fails later


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1] (a share of GPU memory)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1 (world sizes)."""
    return [positive_int(item) for item in text.split(",") if item.strip()] or [positive_int(text)]


def names(allowed: Sequence[str]):
    """A comma-separated list of some of `allowed`, each once -> list[str]."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if not items or unknown or len(set(items)) < len(items):
            what = f"unknown {', '.join(map(repr, unknown))}" if unknown else f"got {text!r}"
            raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(allowed)}, each once; {what}")
        return items

    return parse


def out_folder(text: str) -> str:
    """A folder to write into: an existing one, or a path with no file in the way (it is created)."""
    path = Path(text).expanduser()
    blocking = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {blocking} is a file, not a folder")
    return text


def add_workload_arguments(ap: Any) -> None:
    """The command-line shape of the step that step_workload builds (an argparse parser)."""
    ap.add_argument("--arch", default="qwen2.5-1.5b")
    ap.add_argument("--prompts", type=positive_int, default=16)
    ap.add_argument("--group", type=positive_int, default=8)
    ap.add_argument("--prompt-len", type=positive_int, default=256)
    ap.add_argument("--new-tokens", type=positive_int, default=512)
    ap.add_argument("--micro", type=positive_int, default=16)


def step_workload(args: Any, overrides: Sequence[str] = ()) -> tuple[Any, Any, list[list[int]]]:
    """The GRPO step that bench_step and bench_scaling time, from their common arguments (arch,
    prompts, group, micro, new_tokens, prompt_len) and extra config overrides: the config (the
    architecture with random weights), fixed-length sampling settings (no stop, so every completion
    has new_tokens tokens) and the random prompts -> (Config, SamplingParams, ids)."""
    from minigrpo.config import load_config
    from minigrpo.models.presets import preset_config
    from minigrpo.sampling.params import SamplingParams

    cfg = load_config(
        None,
        [
            f"model.arch={args.arch}",
            f"grpo.prompts_per_step={args.prompts}",
            f"grpo.group_size={args.group}",
            f"train.micro_batch_size={args.micro}",
            f"sampler.max_new_tokens={args.new_tokens}",
            "train.lr=1e-6",
            *overrides,
        ],
    )
    vocab_size = preset_config(args.arch)["vocab_size"]
    params = SamplingParams(n=args.group, temperature=1.0, max_new_tokens=args.new_tokens, ignore_stop=True)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, vocab_size - 100, (args.prompts, args.prompt_len), generator=g).tolist()
    return cfg, params, prompts
