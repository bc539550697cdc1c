"""Where the own sampler's decode step spends its time: one step's GPU kernels, by part and kind.

    python benchmarks/profile_decode.py [--arch qwen2.5-1.5b] [--cases 8x8,64x8] [--prompt-len 256]
                                        [--at 512] [--steps 8] [--out-dir DIR] [--quick]

For each case (P x G rows), the sampler prefills random prompts and decodes until each row holds
`--at` completion tokens, then one decode step (KVCacheSampler._step) is timed three ways:
  graph     the step replayed from a CUDA graph, as the sampler runs it (median of `--steps` x 5)
  kernels   the sum of the step's GPU kernel times (torch.profiler, eager): the graph time minus
            this is the gaps between kernels
  bound     (weight bytes + KV bytes of all rows) / in-run copy bandwidth
  shared    the same with each prompt's KV counted once for its G rows (the sampler's layout)
and the kernel time is split by part of the step (the decoder layers, the LM head, sampling and
bookkeeping) and by kind of kernel (matmul, attention, Triton kernels by name, other torch ops).
Writes results/profile_decode_<device>.json and prints the tables. The step runs the sampler's
internals (`_prefill`, `_draw`, `_step`) on purpose: it is the unit being measured.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from common import (
    DEVICE,
    NullTokenizer,
    copy_bandwidth_gbs,
    environment,
    kernel_kind,
    print_table,
    sync,
    write_result,
)

from minigrpo.errors import ArgumentParser, run_cli
from minigrpo.models.loading import build_random
from minigrpo.models.presets import preset_config
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams


def device_kernels(event) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU kernel launched under a profiler event, children included;
    on the CPU (smoke runs) the self time of the innermost ops stands in for kernels."""
    out = [(k.name, k.duration) for k in getattr(event, "kernels", [])]
    if DEVICE.type != "cuda" and not event.cpu_children:
        out.append((event.name, event.self_cpu_time_total))
    for child in event.cpu_children:
        out += device_kernels(child)
    return out


def decode_state(sampler: KVCacheSampler, P: int, G: int, Tp: int, at: int, vocab: int):
    """The sampler's decode state after `at` completion tokens of P x G random-prompt rows."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, vocab - 100, (P, Tp), generator=g).tolist()
    params = SamplingParams(n=G, temperature=1.0, max_new_tokens=at + 64, ignore_stop=True)
    from minigrpo.sampling.rollout import left_pad

    ids, mask = (t.to(DEVICE) for t in left_pad(prompts, 0))
    rows = torch.arange(P * G, device=DEVICE)
    st, logits = sampler._prefill(ids, mask, params, (0, 0, 0), rows)
    sampler._draw(st, logits, params)
    for s in range(1, at):
        sampler._step(st, kv_len(Tp, s, sampler.kv_bucket, st.mask.shape[1]), params)
    return st, params


def kv_len(Tp: int, s: int, bucket: int, total: int) -> int:
    return min(total, -(-(Tp + s) // bucket) * bucket)


def profile_case(model, cfg: dict, P: int, G: int, Tp: int, at: int, steps: int, bw: float) -> dict:
    sampler = KVCacheSampler(model, NullTokenizer())
    sampler._net = model
    model.eval()
    with torch.no_grad():
        st, params = decode_state(sampler, P, G, Tp, at, cfg["vocab_size"])
        L = kv_len(Tp, at, sampler.kv_bucket, st.mask.shape[1])

        def parts() -> None:  # _step, split into named parts
            with torch.profiler.record_function("layers"):
                hidden = model.hidden(
                    st.tok,
                    attention_mask=st.mask[:, :L],
                    position_ids=st.pos,
                    kv_cache=st.cache,
                    cache_position=st.slot,
                )
            with torch.profiler.record_function("lm head"):
                logits = model.logits(hidden[:, -1])
            with torch.profiler.record_function("sampling"):
                sampler._draw(st, logits, params)

        graph_ms = None
        if DEVICE.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                sampler._step(st, L, params)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                sampler._step(st, L, params)
            times = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    graph.replay()
                end.record()
                sync()
                times.append(start.elapsed_time(end) / steps)
            graph_ms = sorted(times)[2]
            del graph
        parts()  # warm-up
        sync()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if DEVICE.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                parts()
            sync()
    by_part: dict[str, float] = defaultdict(float)
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in prof.events():
        if event.name in ("layers", "lm head", "sampling") and event.cpu_parent is None:
            for name, us in device_kernels(event):
                by_part[event.name] += us / 1e3 / steps
                kind = by_kind[f"{event.name}: {kernel_kind(name)}"]
                kind[0] += us / 1e3 / steps
                kind[1] += 1 / steps
    kernels_ms = sum(by_part.values())
    if DEVICE.type == "cuda":  # Triton kernels launched from Python have no op above them: count every kernel
        raw = [e for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CUDA]
        for e in raw:
            kind = by_kind["all: " + kernel_kind(e.name())]
            kind[0] += e.duration_ns() / 1e6 / steps
            kind[1] += 1 / steps
        by_part["all kernels"] = kernels_ms = sum(e.duration_ns() for e in raw) / 1e6 / steps
    kv_token = (
        2
        * cfg["num_hidden_layers"]
        * cfg["num_key_value_heads"]
        * (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        * 2
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound_ms = (weight_bytes + P * G * (Tp + at) * kv_token) / (bw * 1e9) * 1e3
    shared_ms = (weight_bytes + (P * Tp + P * G * at) * kv_token) / (bw * 1e9) * 1e3  # prompts' KV read once
    return {
        "rows": P * G,
        "kv_slots": L,
        "graph_ms": graph_ms,
        "kernels_ms": kernels_ms,
        "bound_ms": bound_ms,
        "pct_of_bound": None if graph_ms is None else 100 * bound_ms / graph_ms,
        "shared_bound_ms": shared_ms,
        "pct_of_shared_bound": None if graph_ms is None else 100 * shared_ms / graph_ms,
        "by_part_ms": dict(by_part),
        "by_kind": {k: {"ms": v[0], "kernels": v[1]} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][0])},
    }


def main() -> None:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="qwen2.5-1.5b")
    ap.add_argument("--cases", default="8x8,64x8")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--at", type=int, default=512, help="completion tokens already drawn (the KV length)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run), smollm2-135m")
    args = ap.parse_args()
    if args.quick:
        args.arch, args.prompt_len, args.at, args.steps = "smollm2-135m", 16, 4, 2
    cfg = preset_config(args.arch)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    model = build_random(cfg, dtype=dtype, device=DEVICE)
    bw = copy_bandwidth_gbs()
    results = {}
    for name in args.cases.split(","):
        P, G = (int(x) for x in name.split("x"))
        if args.quick:
            P, G = 2, 2
        results[name] = profile_case(model, cfg, P, G, args.prompt_len, args.at, args.steps, bw)
    env = environment()
    path = write_result(
        "profile_decode",
        {
            "environment": env,
            "arch": args.arch,
            "prompt_len": args.prompt_len,
            "at": args.at,
            "copy_gbs": bw,
            "cases": results,
        },
        args.out_dir,
    )
    for name, r in results.items():
        print(
            f"\n{name}: {r['rows']} rows, {r['kv_slots']} KV slots: graph step {r['graph_ms']} ms, "
            f"kernels {r['kernels_ms']:.3f} ms, bound {r['bound_ms']:.3f} ms "
            f"(prompts shared: {r['shared_bound_ms']:.3f} ms)"
        )
        rows = [{"part: kind": k, "ms": v["ms"], "kernels": v["kernels"]} for k, v in r["by_kind"].items()]
        print_table(rows[:18], ["part: kind", "ms", "kernels"])
    print(f"\n{env['device']}, torch {env['torch']}, {args.arch} -> {path}")


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument is one `error:` line
