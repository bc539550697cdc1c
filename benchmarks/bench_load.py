"""Checkpoint loading: time and peak resident memory against checkpoint size, ours vs the usual ways.

    python benchmarks/bench_load.py [--archs smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b] [--loaders ours,naive,...]
                                    [--quick] [--out-dir DIR]

For each architecture a random bf16 checkpoint is written once (safetensors, HF layout), then each
loader runs in a fresh process: the peak RSS is reset (/proc/self/clear_refs) after imports and a
warm-up load of a tiny checkpoint, and the rise of VmHWM during the load is reported as a multiple
of the checkpoint size. Every weight is touched after loading, so that loaders which map the file
and read it lazily are charged for the pages they will read anyway. Loaders:
  ours          load_pretrained: meta-device model, each tensor read straight into its parameter
  naive         build the model in memory, safetensors.load_file, load_state_dict (two copies)
  transformers  AutoModelForCausalLM.from_pretrained (if installed)
  gguf          load_pretrained on the packaged SmolLM2 GGUF (dequantized to fp32), if installed: one row
                of its own (the random checkpoints above are no GGUF files)
Target: ours at most 1.3x the checkpoint size. Writes results/load_<device>.json and a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import environment, names, out_folder, print_table, write_result

from minigrpo.errors import ArgumentParser, run_cli
from minigrpo.models.loading import build_random, save_pretrained
from minigrpo.models.presets import PRESETS, preset_config

LOADERS = ("ours", "gguf", "naive", "transformers")
CHECKPOINT_LOADERS = ("ours", "naive", "transformers")  # the ones that read the random HF checkpoints

CHILD = r"""
import json, sys, time, torch
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))
kind, path, warm = sys.argv[1], sys.argv[2], sys.argv[3]
if kind in ("ours", "gguf"):
    from minigrpo.models.loading import load_pretrained
    dtype = torch.float32 if kind == "gguf" else torch.bfloat16
    load = lambda p: load_pretrained(p, dtype=dtype, load_tokenizer=False)[0]
elif kind == "naive":
    from safetensors.torch import load_file
    from minigrpo.models.args import ModelArgs
    from minigrpo.models.transformer import Transformer
    def load(p):
        model = Transformer(ModelArgs.from_hf_config(json.load(open(p + "/config.json")))).to(torch.bfloat16)
        model.load_state_dict(load_file(p + "/model.safetensors"), strict=False)
        return model
else:
    from transformers import AutoModelForCausalLM
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16)
if kind != "gguf":
    del_me = load(warm)  # warm-up: one-time lazy initialisation inside torch and the loader
    del del_me
open('/proc/self/clear_refs', 'w').write('5')
base = rss('VmRSS')
t0 = time.perf_counter()
model = load(path)
with torch.no_grad():  # touch every weight: lazily mapped files must count once they are read
    for p in model.parameters():
        p.sum()
seconds = time.perf_counter() - t0
# The kernel's RSS counters are per-CPU approximations (off by tens of pages), so a load smaller than
# that can read a peak below its base: that is a rise of zero, not a negative one.
print(json.dumps({"seconds": seconds, "peak_rise": max(0, rss('VmHWM') - base)}))
"""


def run_child(kind: str, path: str, warm: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, path, warm], capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"the loader process exited with {out.returncode}"]
        return {"error": lines[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", type=names(sorted(PRESETS)), default="smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b")
    ap.add_argument("--loaders", type=names(LOADERS), default="ours,naive,transformers,gguf")
    ap.add_argument("--quick", action="store_true", help="smollm2-135m only")
    ap.add_argument("--out-dir", type=out_folder, default=None, help="the JSON's folder (default benchmarks/results)")
    args = ap.parse_args()
    if args.quick:
        args.archs = ["smollm2-135m"]
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        tiny = {**preset_config("smollm2-135m"), "num_hidden_layers": 1, "vocab_size": 512}
        save_pretrained(build_random(tiny, dtype=torch.bfloat16), None, warm)
        loaders = [loader for loader in args.loaders if loader in CHECKPOINT_LOADERS]
        for arch in args.archs if loaders else []:
            ckpt = Path(tmp) / arch
            save_pretrained(build_random(preset_config(arch), dtype=torch.bfloat16), None, ckpt)
            size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            for loader in loaders:
                r = run_child(loader, str(ckpt), str(warm))
                rows.append({"checkpoint": arch, "size_gb": size / 1e9, "loader": loader, **_ratio(r, size)})
                print(rows[-1], flush=True)
        if "gguf" in args.loaders:
            rows += gguf_rows(str(warm))
    payload = {"environment": env, "rows": rows, "target": "ours: peak rise <= 1.3x checkpoint size"}
    path = write_result("load", payload, out_dir=args.out_dir)
    print(f"\n{env['device']}, torch {env['torch']} -> {path.name}")
    print_table(rows, ["checkpoint", "size_gb", "loader", "seconds", "peak_x_size"])


def gguf_rows(warm: str) -> list[dict]:
    """The packaged SmolLM2 GGUF loaded (dequantized to fp32): its peak against the fp32 weights it
    builds (4.2x the file); no row when the package is absent."""
    try:
        from minigrpo.models.gguf import packaged_gguf

        gguf = packaged_gguf("smollm2")
    except Exception as e:  # the packaged model is optional here
        print(f"gguf row skipped: {e}")
        return []
    fp32_bytes = 134_515_008 * 4
    r = run_child("gguf", str(gguf), warm)
    row = {"checkpoint": "smollm2 Q4_1 gguf", "size_gb": gguf.stat().st_size / 1e9, "loader": "gguf"}
    return [{**row, **_ratio(r, fp32_bytes), "note": "ratio vs the fp32 model it builds"}]


def _ratio(r: dict, size: int) -> dict:
    if "error" in r:
        return r
    return {"seconds": r["seconds"], "peak_rise_gb": r["peak_rise"] / 1e9, "peak_x_size": r["peak_rise"] / size}


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument is one `error:` line
