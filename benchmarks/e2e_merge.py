"""Combine `bench_e2e.py --mode learn` results made apart into one: runs side by side on one GPU (one
process per seed or setting), or seeds of earlier leases, each row relabelled; the learning summary
over seeds and the reward plot are redone on the union.

    python benchmarks/e2e_merge.py --tag NAME FILE[:PROVIDER][=LABEL] ...

FILE: a result JSON of bench_e2e.py --mode learn; PROVIDER: take only its rows of that provider;
LABEL: the provider name they get here (e.g. `ours, plain fp32`: the summary groups rows by it, and
compares `ours` with every label starting with `trl`). Each row keeps its file and its file's date
and device (`source`). Writes results/e2e_learn_NAME_<device of the first file>.json and the plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench_e2e import LEARN_CONFIG
from common import RESULTS, device_slug, out_folder, write_result
from e2e_summary import learning, plot_rewards

from minigrpo.errors import ArgumentParser, UsageError, run_cli


def parse_spec(spec: str) -> tuple[Path, str | None, str | None]:
    """FILE[:PROVIDER][=LABEL] -> (file, provider or None, label or None)."""
    spec, _, label = spec.partition("=")
    path, _, provider = spec.partition(":")
    return Path(path), provider or None, label or None


def merge(specs: list[str]) -> tuple[dict, list[dict]]:
    """(the first file's payload, every selected row relabelled and tagged with its source)."""
    first, rows = None, []
    for spec in specs:
        path, provider, label = parse_spec(spec)
        if not path.is_file():
            raise UsageError(f"{path}: no such result file")
        payload = json.loads(path.read_text())
        if payload.get("workload", {}).get("mode") != "learn":
            raise UsageError(f"{path}: not a bench_e2e.py --mode learn result")
        first = first or payload
        picked = [r for r in payload["rows"] if provider is None or r["provider"] == provider]
        if not picked:
            raise UsageError(f"{spec}: no rows of provider {provider!r} in {path}")
        env = payload["environment"]
        for row in picked:
            source = {"file": path.name, "date": env.get("date"), "device": env.get("device")}
            rows.append({**row, "provider": label or row["provider"], "source": source})
    return first, rows


def main() -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="+", metavar="FILE[:PROVIDER][=LABEL]")
    ap.add_argument("--tag", required=True, help="result file e2e_learn_<tag>_<device>.json")
    ap.add_argument("--out-dir", type=out_folder, default=None, help="instead of benchmarks/results")
    args = ap.parse_args()
    first, rows = merge(args.specs)
    env, name = first["environment"], f"e2e_learn_{args.tag}"
    png = (RESULTS if args.out_dir is None else Path(args.out_dir)) / f"{name}_{device_slug(env)}" / "reward_vs_trl.png"
    steps = first["workload"]["steps"]
    plot_rewards(rows, png, f"{LEARN_CONFIG}, {steps} steps ({len(rows)} runs)")
    summary = learning(rows)
    sources = [spec.replace(str(parse_spec(spec)[0]), parse_spec(spec)[0].name, 1) for spec in args.specs]
    payload = {"environment": env, "merged_from": sources, "workload": first["workload"], "rows": rows}
    plot = png.relative_to(RESULTS.parent.parent) if png.is_relative_to(RESULTS.parent.parent) else png.name
    path = write_result(name, {**payload, "plot": str(plot), "learning": summary}, out_dir=args.out_dir)
    for x in summary:
        print({k: v for k, v in x.items() if k != "last10_per_seed"}, [round(t, 3) for t in x["last10_per_seed"]])
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(lambda _: main())
