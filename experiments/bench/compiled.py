"""Compiled training steps with and without CutMixAt: eager, torch.compile and CUDA graphs, side by side.

``python -m experiments.bench.compiled [--quick] [--device cuda] [--models resnet20_cifar:128:32] [--layers 2]``

For each model (``name:batch:image side``) and mode (``eager``, ``default``: torch.compile, and on CUDA
``reduce-overhead``: torch.compile with CUDA graphs), the plain model and ``torch.compile(CutMixAt(model,
layer=k))`` (the wrapper compiled as a user would) train from the same weights on the same batch, in
rotating rounds after the warm-up steps that compile. Reported: the ratio of median step times against
the plain step of the same mode (target: at most 1.05 compiled), and the graphs Dynamo compiled after
the warm-up (target: none: no recompile, no CUDA-graph re-recording caused by a new batch's draw).
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

import featmix

from .common import bench_parser, environment, finish, fmt_ms, start, table
from .step import make_step, run_rounds, summarise

TARGET_RATIO = 1.05


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line, with the device's and --quick's defaults."""
    p = bench_parser(__doc__, "runs/bench/bench_compiled.json")
    p.add_argument("--models", help="comma-separated name:batch:side (default resnet20_cifar:128:32; quick: a tiny "
                                    "timm test model)")
    p.add_argument("--layers", default="2", help="CutMixAt layer indices, one wrapped variant each")
    p.add_argument("--modes", help="comma-separated among eager, default, reduce-overhead (default: all three on "
                                   "CUDA, eager and default on CPU)")
    p.add_argument("--steps", type=int, help="timed rounds (default 30, quick 2)")
    p.add_argument("--backend", help="compile backend for mode 'default' (inductor; quick on CPU: aot_eager)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (the default on CUDA is bf16 + channels_last)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.models = args.models or ("test_resnet:8:32" if args.quick else "resnet20_cifar:128:32")
    args.modes = (args.modes or ("eager,default,reduce-overhead" if cuda else "eager,default")).split(",")
    args.steps = args.steps or (2 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.backend = args.backend or ("aot_eager" if args.quick and not cuda else "inductor")
    args.amp = cuda and not args.fp32
    args.channels_last = args.channels_last or args.amp
    args.layers = [int(v) for v in args.layers.split(",") if v.strip()]
    return args


def compiled(model: nn.Module, mode: str, backend: str) -> nn.Module:
    """``model`` as the mode runs it."""
    if mode == "eager":
        return model
    if mode == "default":
        return torch.compile(model, backend=backend)
    return torch.compile(model, mode=mode)


def graph_count() -> int:
    """Graphs Dynamo has compiled so far (all frames)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def bench_model(spec: str, mode: str, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """Time the plain and wrapped steps of one model in one mode; count graphs compiled after warm-up."""
    import timm

    import models  # noqa: F401  (registers the CIFAR zoo with timm)

    name, batch, side = spec.split(":")
    torch.manual_seed(args.seed)
    base = timm.create_model(name, num_classes=args.num_classes).to(device).train()
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    base = base.to(memory_format=mf)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(int(batch), 3, int(side), int(side), generator=g).to(device).contiguous(memory_format=mf)
    y = torch.randint(args.num_classes, (int(batch),), generator=g).to(device)
    variants = {"plain": make_step(compiled(copy.deepcopy(base), mode, args.backend), mixed=False)}
    for k in args.layers:
        wrapper = featmix.CutMixAt(copy.deepcopy(base), layer=k, generator=torch.Generator().manual_seed(k)).train()
        variants[f"layer={k}"] = make_step(compiled(wrapper, mode, args.backend), mixed=True)
    torch._dynamo.reset()
    run_rounds(variants, x, y, 0, args.warmup, device, args)  # compiles, records the CUDA graphs
    before = graph_count()
    rows = summarise(run_rounds(variants, x, y, args.steps, 0, device, args))
    return {"model": spec, "mode": mode, "variants": rows, "graphs_after_warmup": graph_count() - before}


def verdicts(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per model, mode and wrapped variant: the ratio to the plain step and whether the targets are met."""
    out = []
    for r in results:
        plain = next(v for v in r["variants"] if v["variant"] == "plain")
        for v in r["variants"]:
            if v["variant"] == "plain":
                continue
            ratio = v["median_ms"] / plain["median_ms"]
            target = TARGET_RATIO if r["mode"] != "eager" else None
            out.append({"model": r["model"], "mode": r["mode"], "variant": v["variant"],
                        "plain_ms": plain["median_ms"], "mixed_ms": v["median_ms"], "ratio": ratio,
                        "paired_ratio": 1 + v["paired_overhead_pct"] / 100, "target_ratio": target,
                        "met": None if target is None else ratio <= target,
                        "graphs_after_warmup": r["graphs_after_warmup"]})
    return out


def print_verdicts(rows: List[Dict[str, Any]]) -> None:
    header = ["model", "mode", "variant", "plain ms", "mixed ms", "ratio", "paired", "target", "graphs after warm-up"]
    print(table(header,
                [[r["model"], r["mode"], r["variant"], fmt_ms(r["plain_ms"]), fmt_ms(r["mixed_ms"]),
                  f"{r['ratio']:.3f}", f"{r['paired_ratio']:.3f}",
                  "-" if r["met"] is None else f"<= {r['target_ratio']}: {'MET' if r['met'] else 'MISSED'}",
                  f"{r['graphs_after_warmup']} ({'MET' if r['graphs_after_warmup'] == 0 else 'MISSED'})"]
                 for r in rows]))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run every model x mode, print the table with the verdicts, write the JSON; returns its payload."""
    args, device = start(parse_args(argv))
    print(f"bench_compiled on {device}: models {args.models}, modes {args.modes}, layers {args.layers}, "
          f"{'bf16 autocast + channels_last' if args.amp else 'fp32'}; {args.warmup} warm-up steps then "
          f"{args.steps} rotating rounds; ratio = median mixed step / median plain step of the same mode\n")
    results = [bench_model(spec, mode, args, device) for spec in args.models.split(",") for mode in args.modes]
    rows = verdicts(results)
    print_verdicts(rows)
    payload = {"benchmark": "bench_compiled", "quick": args.quick, "device": str(device),
               "environment": environment(device), "results": results, "verdicts": rows,
               "all_met": all(r["met"] is not False and r["graphs_after_warmup"] == 0 for r in rows)}
    return finish(args.out, payload)


if __name__ == "__main__":
    main()
