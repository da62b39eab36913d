"""The studies' throughput, eager / compiled / compiled + --jobs: `python -m experiments.throughput`.

One small depth ablation (ResNet-20, the baseline and CutMix at the input, two seeds: mixing included) run
three times through the study command in this process: `--no-compile`, the device's defaults (on CUDA:
bf16, channels_last, torch.compile with CUDA graphs), and the defaults with `--jobs`. Per configuration:
the wall time (start-up, data, compilation and training), the training throughput of one run with the
compilation taken out (mean over runs), the aggregate throughput (all training images / wall time), the
compile time and the graphs compiled (a second seed of a setting compiles nothing). Writes throughput.md
and throughput.json under --out. `--smoke` makes it tiny for a CPU dry run (synthetic data, one seed,
dynamo's eager backend).
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from . import openmp  # noqa: F401  (sets OMP_WAIT_POLICY: import it before anything that loads torch)

# isort: split
from . import depth_ablation, results
from .cli import ArgumentParser, HelpFormatter


def parse(argv: Sequence[str] | None) -> Any:
    """The command line of `python -m experiments.throughput`."""
    p = ArgumentParser(prog="python -m experiments.throughput", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--dataset", default="fashion-mnist", help="the studies' --dataset")
    p.add_argument("--data-dir", help="the studies' --data-dir")
    p.add_argument("--train-subset", type=int, default=5120, help="training images (a multiple of the batch)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run")
    p.add_argument("--jobs", type=int, default=2, help="--jobs of the third configuration")
    p.add_argument("--compile-backend", default="inductor", help="the studies' --compile-backend")
    p.add_argument("--smoke", action="store_true", help="tiny, for a CPU dry run: synthetic data, eager backend")
    p.add_argument("--out", default="runs/throughput", help="output directory")
    return p.parse_args(argv)


def study_args(args: Any, out: Path) -> list[str]:
    """The depth ablation every configuration runs (it adds its own speed options)."""
    common = ["--model", "resnet20_cifar", "--layers", "0", "--device", args.device, "--no-progress", "--out", str(out)]
    if args.smoke:
        return common + ["--dataset", "synthetic", "--seeds", "0", "--epochs", "1", "--batch-size", "32",
                         "--eval-batch-size", "64"]
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    return common + ["--dataset", args.dataset, *data, "--seeds", "0", "1", "--train-subset", str(args.train_subset),
                     "--test-subset", "1000", "--epochs", str(args.epochs), "--eval-every", str(args.epochs)]


def measure(name: str, argv: list[str], out: Path) -> dict[str, Any]:
    """Run the study once; its wall time and what its rows say about speed."""
    t0 = time.perf_counter()
    depth_ablation.main(argv)
    wall = time.perf_counter() - t0
    rows = results.load_rows(out)
    images = sum(r["epochs"] * r["train_size"] for r in rows)
    return {"config": name, "wall_s": round(wall, 1), "runs": len(rows),
            "run_images_per_s": round(statistics.fmean(r["images_per_s"] for r in rows), 1),
            "aggregate_images_per_s": round(images / wall, 1),
            "compile_s": round(sum(r.get("compile_time_s") or 0 for r in rows), 1),
            "graphs": sum(r.get("compiled_graphs") or 0 for r in rows), "device": rows[0]["device"]}


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the three configurations."""
    return results.md_table(
        ["configuration", "wall s", "runs", "img/s per run (training)", "img/s aggregate (wall)", "compile s",
         "graphs compiled", "device"],
        [[r["config"], f"{r['wall_s']:.1f}", r["runs"], f"{r['run_images_per_s']:.0f}",
          f"{r['aggregate_images_per_s']:.0f}", f"{r['compile_s']:.1f}", r["graphs"], r["device"]] for r in rows])


def main(argv: Sequence[str] | None = None) -> Path:
    """Measure the three configurations, writing the table after each; returns the output directory."""
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = ["--compile-backend", "eager" if args.smoke else args.compile_backend]
    configs = [("eager", ["--no-compile"]), ("compiled", ["--compile", *backend]),
               (f"compiled + --jobs {args.jobs}", ["--compile", *backend, "--jobs", str(args.jobs)])]
    rows = []
    for i, (name, extra) in enumerate(configs):
        run_out = out / f"config{i}"
        shutil.rmtree(run_out, ignore_errors=True)  # always a fresh measurement, never a resumed one
        rows.append(measure(name, study_args(args, run_out) + extra, run_out))
        (out / "throughput.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / "throughput.md").write_text(f"# study throughput (ResNet-20, baseline + CutMix at the input)\n\n"
                                           f"{' '.join(study_args(args, Path('OUT')))}\n\n{table(rows)}\n")
    print("\n" + table(rows) + f"\n\ntable: {out / 'throughput.md'}")
    return out


if __name__ == "__main__":
    main()
