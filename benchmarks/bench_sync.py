"""vLLM weight sync, verification and colocation memory per architecture (and optional sync variants, rollout).

    python benchmarks/bench_sync.py [--archs smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b] [--reps 5]
                                    [--sleep-levels 1,2] [--gpu-memory-utilization 0.3] [--enforce-eager]
                                    [--variants stream,bucket512,layer,tensor] [--rollout 8x8]
                                    [--isolate/--no-isolate] [--tag NAME] [--out-dir DIR] [--quick]

Needs vLLM (on the CPU: `bash .ci/install_vllm.sh`, then run with .venv/vllm/bin/python). For each
architecture (presets such as qwen2.5-1.5b, or the random Llama sizes 10m/50m/150m; random weights,
bf16 on GPU, fp32 on the CPU) one in-process `VLLMSampler` (sleep mode on) is built and measured:
  sync     `sampler.sync(policy)` without verification: the weight push (buckets of whole layers,
           512 MB, the default) + tied-head refresh + prefix-cache reset; median of --reps
  verify   `sampler.verify(policy)` alone (fingerprints + one-forward log-prob probe); median of --reps,
           with its parts (fingerprints_ms: both sides' fingerprints, read back in one copy; probe_ms:
           one forward on each side), and without the probe (verify_fp_ms: fingerprints only, what
           a sync checks between probes); verify_step_ms: the mean per sync for the default
           cadence, the probe on every sampler.vllm_probe_every-th sync (probe_every)
  memory   torch.cuda.memory_allocated / memory_reserved and the driver's free bytes (mem_get_info)
           with the policy alone, the engine awake, after `sampler.sleep()` and after waking, for each
           sleep level: level 1 keeps the weights in CPU memory and `sampler.wake()` restores them;
           level 2 drops them and the wake is `sampler.sync(policy)` (a push from the policy in device
           memory, verified). Loader calls and weight-file opens during the wake are counted
           (`reload_from_disk`; the engine was built with dummy weights from a folder deleted after
           construction, so no weights exist on disk). vLLM's sleep mode allocates through its own
           pool, so the driver's free bytes are the figure that shows memory handed back. The CPU
           backend has no sleep mode (sleep is a no-op there) and no device memory: n.a.
Targets: a 1.5B model synced in <= 50 ms and verified in <= 50 ms more (per sync, on average:
verify_step_ms).
Optional (--variants, default none): the sync variants of earlier results (stream: one call;
bucket512; layer: one call per layer; tensor: one call per tensor, NOT a correct sync), min of
--reps, with peak extra memory. --rollout PxG (default none): vLLM vs the own sampler tokens/s.
On CUDA every architecture runs in its own process (--isolate, the default there): one vLLM engine
per process. Writes results/sync[_TAG]_<device>.json and prints tables.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    DEVICE,
    NullTokenizer,
    environment,
    fraction,
    gpu_memory,
    out_folder,
    peak_bytes,
    positive_int,
    print_table,
    reset_peak,
    sync,
    timings,
    write_result,
)

from minigrpo.config import SamplerCfg
from minigrpo.errors import ArgumentParser, run_cli
from minigrpo.models.loading import build_random
from minigrpo.models.presets import preset_config
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams
from minigrpo.sampling.vllm_sampler import VLLMSampler
from minigrpo.sampling.vllm_sync import policy_weights_for_sync, worker_load


def llama(vocab: int, dim: int, layers: int, heads: int, ffn: int) -> dict:
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_act="silu",
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )


SIZES = {  # head_dim 64 throughout (a size the CPU attention backend supports)
    "10m": llama(8192, 256, 6, 4, 768),
    "50m": llama(16384, 512, 10, 8, 1536),
    "150m": llama(32000, 768, 12, 12, 2304),
}
VARIANTS = {"stream": None, "bucket512": 512.0, "layer": 0.0}


# ------------------------------------------------------------------------------------------------
# memory


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def mem_start() -> int:
    """Reset the peak counter; returns the current usage in bytes (GPU: allocated, CPU: RSS)."""
    if DEVICE.type == "cuda":
        return reset_peak()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _rss_kib("VmRSS") * 1024


def mem_peak_extra(base: int) -> int:
    return (peak_bytes() if DEVICE.type == "cuda" else _rss_kib("VmHWM") * 1024) - base


# ------------------------------------------------------------------------------------------------
# measurements


def time_sync(sampler: VLLMSampler, model, bucket_mb: float | None, reps: int) -> dict:
    sampler.bucket_bytes = None if bucket_mb is None else int(bucket_mb * 2**20)
    sampler.verify_sync = False  # timed separately
    sampler.sync(model)  # warm-up
    times, calls, extra = [], 0.0, 0
    for _ in range(reps):
        base = mem_start()
        sync()
        t0 = time.perf_counter()
        sampler.sync(model)
        stats = sampler.last_sync
        sync()
        times.append(time.perf_counter() - t0)
        extra = max(extra, mem_peak_extra(base))
        calls = stats["sync_calls"]
    return {"sync_s": min(times), "calls": calls, "peak_extra_mb": extra / 2**20}


def time_per_tensor(sampler: VLLMSampler, model, reps: int) -> dict:
    times, calls, extra = [], 0, 0
    for _ in range(reps):
        base = mem_start()
        sync()
        t0 = time.perf_counter()
        calls = 0
        for name, t in policy_weights_for_sync(model):
            sampler.llm.collective_rpc(worker_load, args=([(name, t)],))
            calls += 1
        sampler.llm.reset_prefix_cache()
        sync()
        times.append(time.perf_counter() - t0)
        extra = max(extra, mem_peak_extra(base))
    sampler.bucket_bytes = None
    sampler.sync(model)  # put correct weights back
    return {"sync_s": min(times), "calls": float(calls), "peak_extra_mb": extra / 2**20}


def time_rollout(generate, prompts, params: SamplingParams) -> dict:
    generate(prompts[:2], SamplingParams(n=2, max_new_tokens=8, ignore_stop=True))  # warm-up
    sync()
    t0 = time.perf_counter()
    r = generate(prompts, params)
    sync()
    seconds = time.perf_counter() - t0
    tokens = int(r.completion_mask.sum())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def loader_watch():
    """Count vLLM model-loader calls and weight-file opens while active -> (start, stop() -> counts)."""
    import builtins

    counts = {"loader_calls": 0, "weight_file_opens": 0}
    patches: list[tuple[object, str, object]] = []

    def patch(owner, name, wrapper_of):
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if original is None:
            return
        patches.append((owner, name, original))
        setattr(owner, name, wrapper_of(original))

    def counting(key):
        def wrap(fn):
            def wrapper(*a, **k):
                counts[key] += 1
                return fn(*a, **k)

            return wrapper

        return wrap

    def counting_open(fn):
        def wrapper(file, *a, **k):
            if str(file).endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")):
                counts["weight_file_opens"] += 1
            return fn(file, *a, **k)

        return wrapper

    def start():
        try:
            from vllm.model_executor.model_loader.base_loader import BaseModelLoader

            todo, seen = [BaseModelLoader], set()
            while todo:
                cls = todo.pop()
                if cls in seen:
                    continue
                seen.add(cls)
                todo += cls.__subclasses__()
                for name in ("download_model", "load_model", "load_weights"):
                    patch(cls, name, counting("loader_calls"))
        except ImportError:
            pass
        patch(builtins, "open", counting_open)
        try:
            import safetensors

            patch(safetensors, "safe_open", counting_open)
        except ImportError:
            pass

    def stop() -> dict:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)
        patches.clear()
        return dict(counts)

    return start, stop


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def timed_median(fn, reps: int) -> tuple[float, list[float]]:
    times = timings(fn, reps)
    return median(times), times


def time_verify(sampler: VLLMSampler, model, reps: int, probe: bool) -> dict:
    """Median wall ms of `sampler.verify(model, probe=probe)` over `reps` (after a warm-up), and
    the medians of its two parts as its stats time them."""
    parts: list[dict] = []
    seconds, every = timed_median(lambda: parts.append(sampler.verify(model, probe=probe)), reps)
    parts = parts[1:]  # the warm-up call
    return {
        "ms": seconds * 1e3,
        "ms_all": [t * 1e3 for t in every],
        "fingerprints_ms": median([p["verify_fingerprints_s"] for p in parts]) * 1e3,
        "probe_ms": median([p["verify_probe_s"] for p in parts]) * 1e3,
    }


def colocation(sampler: VLLMSampler, model, levels: list[int], memory: dict) -> list[dict]:
    """Memory awake / asleep / woken for each sleep level, the wake path and its disk reads."""
    rows = []
    try:  # the folder vLLM was built from (config.json only; deleted after construction)
        model_dir = str(sampler.llm.llm_engine.model_config.model)
    except AttributeError:
        model_dir = ""
    for level in levels:
        sampler.sleep_level = level
        sampler.verify_sync = True
        sampler.sync(model)  # awake, on the current weights
        awake = gpu_memory()
        sampler.sleep()
        asleep = gpu_memory()
        slept = sampler.sleeping
        start, stop = loader_watch()
        start()
        t0 = time.perf_counter()
        try:
            if slept and level >= 2:
                path = "sync(policy): weights pushed from the policy in device memory"
                sampler.sync(model)
            else:
                path = "wake(): vLLM wake_up, weights restored from CPU memory" if slept else "no-op (no sleep mode)"
                sampler.wake()
            sync()
            wake_s = time.perf_counter() - t0
        finally:
            counts = stop()
        woken = gpu_memory()
        check = sampler.verify(model)  # the woken engine holds the policy's weights (CUDA graphs replayed)
        rows.append(
            {
                "sleep_level": level,
                "slept": slept,
                "wake_path": path,
                "wake_s": wake_s,
                "policy_only": memory,
                "awake": awake,
                "asleep": asleep,
                "woken": woken,
                **counts,
                "engine_model_dir_exists": bool(model_dir) and os.path.exists(model_dir),
                "reload_from_disk": counts["weight_file_opens"] > 0,
                "probe_diff_max_after_wake": check["probe_diff_max"],
            }
        )
    return rows


def bench_arch(name: str, cfg: dict, dtype: torch.dtype, args) -> dict:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    model = build_random(cfg, dtype=dtype, device=DEVICE, seed=0).eval()
    policy_memory = gpu_memory()
    n_params = sum(p.numel() for p in model.parameters())
    P, G = (int(x) for x in args.rollout.split("x")) if args.rollout else (1, 1)
    t0 = time.perf_counter()
    sampler = VLLMSampler(
        model,
        NullTokenizer(),
        max_model_len=args.prompt_len + args.new_tokens,
        max_num_seqs=max(P * G, 8),
        gpu_memory_utilization=args.gpu_memory_utilization,
        sleep=True,
        enforce_eager=True if args.enforce_eager else None,
        seed=0,
    )
    startup = time.perf_counter() - t0
    info = {
        "arch": name,
        "params_m": n_params / 1e6,
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "startup_s": startup,
    }
    out: dict = {"info": info}
    try:
        sampler.bucket_bytes = 512 * 2**20
        sampler.verify_sync = False
        sync_s, sync_all = timed_median(functools.partial(sampler.sync, model), args.reps)
        stats = dict(sampler.last_sync)
        full = time_verify(sampler, model, args.reps, probe=True)
        fp_only = time_verify(sampler, model, args.reps, probe=False)
        k = SamplerCfg().vllm_probe_every  # the default cadence: one probed check in k
        per_step = (full["ms"] + (k - 1) * fp_only["ms"]) / k if k else fp_only["ms"]
        probe = sampler.verify(model)
        out["timing"] = {
            **info,
            "sync_ms": sync_s * 1e3,
            "verify_ms": full["ms"],
            "fingerprints_ms": full["fingerprints_ms"],
            "probe_ms": full["probe_ms"],
            "verify_fp_ms": fp_only["ms"],
            "probe_every": k,
            "verify_step_ms": per_step,
            "sync_ms_all": [t * 1e3 for t in sync_all],
            "verify_ms_all": full["ms_all"],
            "verify_fp_ms_all": fp_only["ms_all"],
            "calls": stats.get("sync_calls"),
            "tensors": stats.get("sync_tensors"),
            "sync_mb": stats.get("sync_mb"),
            **probe,
        }
        out["memory"] = colocation(sampler, model, args.sleep_levels, policy_memory)
        variants = [v for v in args.variants.split(",") if v]
        out["variants"] = []
        for variant in variants:
            if variant == "tensor":
                r = time_per_tensor(sampler, model, args.reps)
            elif variant in VARIANTS:
                r = time_sync(sampler, model, VARIANTS[variant], args.reps)
            else:
                raise ValueError(f"unknown variant {variant!r}")
            out["variants"].append({**info, "variant": variant, **r})
        sampler.bucket_bytes = 512 * 2**20
        if args.rollout:
            gen = torch.Generator().manual_seed(0)
            prompts = torch.randint(3, cfg["vocab_size"], (P, args.prompt_len), generator=gen).tolist()
            params = SamplingParams(n=G, temperature=1.0, max_new_tokens=args.new_tokens, ignore_stop=True)
            out["rollout"] = {
                "arch": name,
                "rollout": args.rollout,
                "vllm": time_rollout(sampler.generate, prompts, params),
                "own": time_rollout(KVCacheSampler(model, NullTokenizer()).generate, prompts, params),
            }
    finally:
        sampler.close()
        del sampler, model
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return out


def run_isolated(arch: str, args) -> dict:
    """bench_arch in a fresh process (one vLLM engine per process)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "arch.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--archs", arch, "--child-json", str(result)]
        cmd += ["--reps", str(args.reps), "--sleep-levels", ",".join(map(str, args.sleep_levels))]
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--variants", args.variants]
        cmd += ["--rollout", args.rollout, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
        cmd += ["--no-isolate"] + (["--dtype", args.dtype] if args.dtype else [])
        cmd += ["--enforce-eager"] if args.enforce_eager else []
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"the process for {arch} exited with status {proc.returncode}")
        return json.loads(result.read_text())


def gib(x) -> float | None:
    return None if x is None else x / 2**30


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", "--sizes", dest="archs", default="smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default: float32 on the CPU, bfloat16 on GPU",
    )
    parser.add_argument("--reps", type=positive_int, default=5)
    parser.add_argument("--sleep-levels", default="1,2", help="sleep levels measured for colocation")
    parser.add_argument("--gpu-memory-utilization", type=fraction, default=0.3)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compilation in vLLM")
    parser.add_argument("--variants", default="", help="extra sync variants: stream,bucket512,layer,tensor")
    parser.add_argument("--rollout", default="", help="P x G rollout comparison, e.g. 8x8 (default: none)")
    parser.add_argument("--prompt-len", type=positive_int, default=64)
    parser.add_argument("--new-tokens", type=positive_int, default=128)
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    parser.add_argument("--tag", default="", help="result file sync_<tag>_<device>.json")
    parser.add_argument(
        "--out-dir", type=out_folder, default=None, help="write the JSON here instead of benchmarks/results"
    )
    parser.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="the 10m model, 2 reps (writes sync_quick_*.json)")
    args = parser.parse_args()
    if args.quick:
        args.archs, args.new_tokens, args.reps = "10m", 32, 2
    try:
        args.sleep_levels = [int(x) for x in str(args.sleep_levels).split(",") if x]
    except ValueError:
        parser.error(f"--sleep-levels: integers separated by commas, got {args.sleep_levels!r}")
    if args.rollout and not re.fullmatch(r"\d+x\d+", args.rollout):
        parser.error(f"--rollout: P x G such as 8x8, got {args.rollout!r}")
    archs = [a for a in args.archs.split(",") if a]
    for a in archs:
        if a not in SIZES:
            try:
                preset_config(a)
            except Exception as e:
                parser.error(f"--archs: {a!r}: {e}")
    isolate = (DEVICE.type == "cuda") if args.isolate is None else args.isolate
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    dtype = getattr(torch, args.dtype or ("bfloat16" if DEVICE.type == "cuda" else "float32"))
    if args.child_json:  # one architecture for a parent process
        out = bench_arch(archs[0], SIZES.get(archs[0]) or preset_config(archs[0]), dtype, args)
        Path(args.child_json).write_text(json.dumps(out))
        return
    env = environment()
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except ImportError as e:
        env["vllm"] = f"not importable: {e}"
    results, errors = {}, {}
    for name in archs:
        try:
            if isolate:
                results[name] = run_isolated(name, args)
            else:
                results[name] = bench_arch(name, SIZES.get(name) or preset_config(name), dtype, args)
        except Exception as e:  # record and go on with the next architecture
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"{name} failed: {errors[name]}", flush=True)
            continue
        t = results[name]["timing"]
        print(
            f"{name}: sync {t['sync_ms']:.1f} ms, verify {t['verify_ms']:.1f} ms (fingerprints"
            f" {t['fingerprints_ms']:.1f} + probe {t['probe_ms']:.1f}), fingerprints only {t['verify_fp_ms']:.1f} ms",
            flush=True,
        )

    timing = [r["timing"] for r in results.values()]
    for t in timing:
        big = t["params_m"] > 1000  # the target names a 1.5B model
        t["sync_target"] = ("met" if t["sync_ms"] <= 50 else "missed") if big else "-"
        t["verify_target"] = ("met" if t["verify_step_ms"] <= 50 else "missed") if big else "-"
    print(
        "\nsync = push + prefix-cache reset; verify = fingerprints + probe, verify_fp = fingerprints only"
        " (medians); verify_step = mean per sync with the probe every probe_every-th; targets for 1.5B:"
        " sync 50 ms, verify_step 50 ms"
    )
    cols = ["arch", "params_m", "weights_mb", "startup_s", "calls", "sync_ms", "sync_target", "fingerprints_ms"]
    cols += ["probe_ms", "verify_ms", "verify_fp_ms", "probe_every", "verify_step_ms", "verify_target"]
    print_table(timing, [*cols, "probe_diff_max"])
    memory = []
    for name, r in results.items():
        for m in r["memory"]:
            row = {"arch": name, "level": m["sleep_level"], "wake_path": m["wake_path"].split(":")[0]}
            for phase in ("policy_only", "awake", "asleep", "woken"):
                row[f"{phase}_alloc_gib"] = gib(m[phase]["allocated"])
                row[f"{phase}_free_gib"] = gib(m[phase]["free"])
            row.update(wake_s=m["wake_s"], from_disk=m["reload_from_disk"], loader_calls=m["loader_calls"])
            memory.append(row)
    print("\ncolocation memory (GiB; n.a. on the CPU): allocated by torch / free on the device")
    print_table(
        memory,
        [
            "arch",
            "level",
            "wake_path",
            *[f"{p}_{k}_gib" for p in ("policy_only", "awake", "asleep", "woken") for k in ("alloc", "free")],
            "wake_s",
            "from_disk",
            "loader_calls",
        ],
    )
    variants = [v for r in results.values() for v in r.get("variants", [])]
    if variants:
        print()
        print_table(variants, ["arch", "variant", "calls", "sync_s", "peak_extra_mb", "probe_diff_max"])
    rollouts = [r["rollout"] for r in results.values() if "rollout" in r]
    if rollouts:
        table = [
            {
                "arch": r["arch"],
                "rollout": r["rollout"],
                "tokens": r["vllm"]["tokens"],
                "vllm_tok_s": r["vllm"]["tokens_per_s"],
                "own_tok_s": r["own"]["tokens_per_s"],
                "vllm/own": r["vllm"]["tokens_per_s"] / r["own"]["tokens_per_s"],
            }
            for r in rollouts
        ]
        print()
        print_table(table, ["arch", "rollout", "tokens", "vllm_tok_s", "own_tok_s", "vllm/own"])
    for name, message in errors.items():
        print(f"failed: {name}: {message}")
    payload = {
        "environment": env,
        "dtype": str(dtype).removeprefix("torch."),
        "args": vars(args),
        "how": __doc__,
        "timing": timing,
        "memory": {name: r["memory"] for name, r in results.items()},
        "variants": variants,
        "rollout": rollouts,
        "errors": errors,
    }
    name = "sync_quick" if args.quick else "sync"
    name = f"{name}_{args.tag}" if args.tag else name
    print(f"\nwrote {write_result(name, payload, out_dir=args.out_dir)}")


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument is one `error:` line
