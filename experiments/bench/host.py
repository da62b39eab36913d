"""Host work per call: what a mix costs the CPU that dispatches it (the GPU's bottleneck at CIFAR sizes).

``python -m experiments.bench.host [--quick] [--out runs/bench/bench_host.json]``

On a GPU at CIFAR sizes a mix is host-bound: the kernels take microseconds and the host's dispatching
is the cost. It is measured here on the CPU, on maps so small that the paste is negligible. Every row
is a ratio of medians measured in the same run, contenders interleaved in rotating order (a slow phase
of the shared machine hits all of them); each timed sample is a loop of ``--inner`` calls, on one
thread (``--threads`` to change it) except the contention row, which runs at torch's default. Rows:

- ``CutMix(inplace)`` on (64,3,8,8) against timm ``Mixup`` (cutmix, batch mode) and against its own
  ``featmix.functional.paste_box_`` on the box and partners it drew (the floor of the eager paste);
- the same against timm on (256,3,32,32);
- a ``CutMixAt(layer=2)`` training forward of ``resnet8_cifar`` on (8,3,8,8) minus the plain forward,
  in microseconds and against what ``CutMix(inplace)`` on the same batch adds to the plain forward when
  it runs just before it, as it does in a training loop (host code between a model's ops runs several
  times slower than in a loop of its own: its instructions and data are no longer in the caches; the
  call's own time in a loop is reported beside it);
- the per-sample modes (``mode="elem"``/``"pair"``) against batch mode, out of place;
- contention: ``CutMix(inplace)`` on (64,3,224,224) at torch's thread count while other processes keep
  every core busy, against its time alone, with ``x.clone()`` beside it for scale, and the same call on
  one thread (no parallel region: each region of a busy machine waits for a descheduled thread).

Beside the targets, each row of a call has an *eager floor*: the same work written by hand with the
fewest Python steps and ops (the same draws from the generator, the reference box rule on Python
numbers, featmix's own ``paste_box_``/``paste_box`` on that box, targets from a one-hot table by one
gather and one blend), with no validation, no record and no bookkeeping for checkpointing. It is what
the row's target is measured against in practice: a target below the floor cannot be met by any
eager implementation of the same draws, and ``featmix / floor`` is the library's own overhead.

Only featmix's public API is used (the box for ``paste_box_`` comes from ``last_mix``).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import featmix
import featmix.functional as FF

from .common import bench_parser, environment, finish, fmt_ratio, table

K = 10


def _per_call_us(fn: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e6 / inner


def interleave(cases: Dict[str, Callable[[], Any]], repeats: int, warmup: int, inner: int) -> Dict[str, float]:
    """Median microseconds per call of each case: ``repeats`` samples of ``inner`` calls, interleaved in
    rotating order after ``warmup`` untimed rounds."""
    names = list(cases)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            us = _per_call_us(cases[name], inner)
            if r >= warmup:
                samples[name].append(us)
    return {n: statistics.median(s) for n, s in samples.items()}


def reference_box(u: Sequence[float], h: int, w: int) -> Tuple[int, int, int, int]:
    """The reference code's box on an h x w grid from the draw's uniforms (centre y, x at u[1], u[2]; lam u[4])."""
    rat = math.sqrt(1.0 - u[4])
    cut_h, cut_w = int(h * rat), int(w * rat)
    cy, cx = int(u[1] * h), int(u[2] * w)
    return max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)


def eager_floor_input(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int,
                      inplace: bool = True) -> Callable[[], Any]:
    """The eager floor of ``CutMix(inplace=inplace)``'s call: its draws, the box in Python, ``paste_box_``
    (``paste_box`` out of place), and the targets by one gather from a one-hot table and one blend."""
    g = torch.Generator().manual_seed(seed)
    table = torch.eye(num_classes)
    batch, (h, w) = x.shape[0], x.shape[-2:]
    paste = FF.paste_box_ if inplace else FF.paste_box

    def call() -> Any:
        u = torch.rand(5, generator=g, dtype=torch.float64).tolist()
        perm = torch.randperm(batch, generator=g)
        y1, y2, x1, x2 = box = reference_box(u, h, w)
        mixed = paste(x, perm, box) if y2 > y1 and x2 > x1 else x
        own = table.index_select(0, y)
        return mixed, own.index_select(0, perm).lerp_(own, 1.0 - (y2 - y1) * (x2 - x1) / (h * w))

    return call


def eager_floor_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int) -> Callable[[], Any]:
    """The eager floor of ``CutMix(mode="batch")``'s call out of place (``eager_floor_input``)."""
    return eager_floor_input(x, y, num_classes, seed, inplace=False)


def eager_floor_per_sample(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int) -> Callable[[], Any]:
    """The eager floor of ``CutMix(mode="elem")``'s call (out of place): its draws, each sample's box by
    the reference rule on (B,) tensors, ``paste_box_masked``, and the targets by one gather from a one-hot
    table and one blend with each sample's weight."""
    g = torch.Generator().manual_seed(seed)
    table = torch.eye(num_classes)
    batch, (h, w) = x.shape[0], x.shape[-2:]
    sides = torch.tensor([[float(h)], [float(w)]], dtype=torch.float64)

    def call() -> Any:
        torch.rand(5, generator=g, dtype=torch.float64)  # the batch's uniforms: drawn, as featmix draws them
        perm = torch.randperm(batch, generator=g)
        rows = torch.rand(6, batch, generator=g, dtype=torch.float64)  # lam, centre y, x, (three unused here)
        torch.rand(batch, generator=g, dtype=torch.float64)  # each sample's gate (prob 1: every sample mixes)
        half = torch.floor(torch.floor(sides * torch.sqrt(1.0 - rows[0])) / 2)  # (2, B)
        centre = torch.minimum(torch.floor(rows[1:3] * sides), sides - 1)
        lo, hi = torch.clamp(centre - half, min=0), torch.minimum(centre + half, sides)
        box = torch.stack((lo[0], hi[0], lo[1], hi[1])).long()
        kept = 1.0 - (hi[0] - lo[0]) * (hi[1] - lo[1]) / (h * w)
        own = table.index_select(0, y)
        return FF.paste_box_masked(x, perm, box), own.index_select(0, perm).lerp_(own, kept.float().view(-1, 1))

    return call


def eager_floor_feature(net: torch.nn.Module, layer: int, num_classes: int, seed: int) -> Callable[..., Any]:
    """The eager floor of a ``CutMixAt(layer=...)`` training forward of ``net``: its draws, a forward hook
    on the same module that places the box in Python and pastes it with ``paste_box`` (differentiable),
    and the targets by one gather from a one-hot table and one blend."""
    g = torch.Generator().manual_seed(seed)
    table = torch.eye(num_classes)
    state: Dict[str, Any] = {}

    def hook(module: torch.nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        h, w = out.shape[-2:]
        y1, y2, x1, x2 = box = reference_box(state["u"], h, w)
        state["weight"] = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
        return FF.paste_box(out, state["perm"], box) if y2 > y1 and x2 > x1 else out

    spec, = featmix.resolve_layers(net, layer)
    net.get_submodule(spec.hook_name).register_forward_hook(hook)

    def forward(x: torch.Tensor, y: torch.Tensor) -> Any:
        state["u"] = torch.rand(5, generator=g, dtype=torch.float64).tolist()
        state["perm"] = perm = torch.randperm(x.shape[0], generator=g)
        out = net(x)
        own = table.index_select(0, y)
        return out, own.index_select(0, perm).lerp_(own, state["weight"])

    return forward


def _timm_cutmix(batch_hw: Sequence[int]) -> Any:
    from timm.data import Mixup
    return Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, mode="batch", label_smoothing=0.0, num_classes=K)


def input_rows(shape: Sequence[int], args: argparse.Namespace, with_floor: bool) -> List[Dict[str, Any]]:
    """CutMix(inplace) against timm's Mixup (and its own paste_box_ on the box it drew)."""
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(*shape, generator=g)
    y = torch.randint(0, K, (shape[0],), generator=g)
    cm = featmix.CutMix(K, inplace=True, generator=torch.Generator().manual_seed(args.seed))
    timm_mix = _timm_cutmix(shape[2:])
    cm(x, y)
    rec = cm.last_mix
    cases = {"featmix": lambda: cm(x, y), "timm": lambda: timm_mix(x, y),
             "eager floor": eager_floor_input(x, y, K, args.seed)}
    if with_floor:
        cases["paste_box_"] = lambda: FF.paste_box_(x, rec.perm, rec.box)
    us = interleave(cases, args.repeats, args.warmup, args.inner)
    name = f"CutMix(inplace) {tuple(shape)}"
    rows = [row(f"{name} vs timm Mixup", "timm / featmix", us["timm"] / us["featmix"],
                ">=", 2.0 if shape[-1] <= 8 else 1.5, us),
            row(f"  {name}: timm vs the eager floor", "timm / floor", us["timm"] / us["eager floor"], None, None, us)]
    if with_floor:
        rows += [row(f"{name} vs its paste_box_", "featmix / paste_box_", us["featmix"] / us["paste_box_"], "<=", 2.0,
                     us),
                 row(f"  {name}: the eager floor vs paste_box_", "floor / paste_box_",
                     us["eager floor"] / us["paste_box_"], None, None, us)]
    rows.append(row(f"  {name}: featmix vs the eager floor", "featmix / floor", us["featmix"] / us["eager floor"],
                    None, None, us))
    return rows


def feature_rows(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """CutMixAt(layer=2) training forward minus the plain forward, against the input transform's call."""
    import timm

    import models  # noqa: F401 - registers resnet8_cifar with timm

    torch.manual_seed(args.seed)
    net = timm.create_model("resnet8_cifar", num_classes=K).train()
    wrapped = featmix.CutMixAt(net, layer=2, generator=torch.Generator().manual_seed(args.seed)).train()
    torch.manual_seed(args.seed)
    floor = eager_floor_feature(timm.create_model("resnet8_cifar", num_classes=K).train(), 2, K, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(8, 3, 8, 8, generator=g)  # a tiny map: the paste costs microseconds, the host the rest
    y = torch.randint(0, K, (8,), generator=g)
    xi = x.clone()
    cm = featmix.CutMix(K, inplace=True, generator=torch.Generator().manual_seed(args.seed))

    def input_mix_then_forward() -> Any:
        cm(xi, y)
        return net(x)

    cases = {"plain": lambda: net(x), "CutMixAt": lambda: wrapped(x, y), "eager floor": lambda: floor(x, y),
             "CutMix(inplace) + plain": input_mix_then_forward, "CutMix(inplace)": lambda: cm(xi, y)}
    us = interleave(cases, args.repeats, args.warmup, max(1, args.inner // 4))
    extra = us["CutMixAt"] - us["plain"]
    floor_extra = us["eager floor"] - us["plain"]
    input_extra = us["CutMix(inplace) + plain"] - us["plain"]
    return [row("CutMixAt(layer=2) fwd - plain fwd, resnet8_cifar (8,3,8,8)", "extra us", extra, "<=", 60.0, us),
            row("  the eager floor's fwd - plain fwd", "floor extra us", floor_extra, None, None, us),
            row("CutMixAt extra vs CutMix(inplace) + plain fwd - plain fwd, same batch", "extra / input extra",
                extra / input_extra, "<=", 1.0, us),
            row("  the eager floor's extra vs CutMix(inplace)'s", "floor / input extra", floor_extra / input_extra,
                None, None, us),
            row("  CutMixAt extra vs the eager floor's", "extra / floor extra", extra / floor_extra, None, None, us)]


def per_sample_rows(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Per-sample modes against batch mode (out of place) on (64,3,8,8)."""
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(64, 3, 8, 8, generator=g)
    y = torch.randint(0, K, (64,), generator=g)
    mk = {m: featmix.CutMix(K, mode=m, generator=torch.Generator().manual_seed(args.seed))
          for m in ("batch", "elem", "pair")}
    cases = {m: (lambda t=t: t(x, y)) for m, t in mk.items()}
    cases["elem eager floor"] = eager_floor_per_sample(x, y, K, args.seed)
    cases["batch eager floor"] = eager_floor_batch(x, y, K, args.seed)
    us = interleave(cases, args.repeats, args.warmup, args.inner)
    rows = [row(f"CutMix(mode={m!r}) vs batch mode (64,3,8,8)", f"{m} / batch", us[m] / us["batch"], "<=", 1.5, us)
            for m in ("elem", "pair")]
    return rows + [row("  the elem eager floor vs the batch eager floor", "floor elem / floor batch",
                       us["elem eager floor"] / us["batch eager floor"], None, None, us),
                   row("  CutMix(mode='elem') vs its eager floor", "elem / floor", us["elem"] / us["elem eager floor"],
                       None, None, us)]


def contention_rows(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """CutMix(inplace) on a large batch alone and with every core kept busy by other processes."""
    shape = (8, 3, 64, 64) if args.quick else (64, 3, 224, 224)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(*shape, generator=g)
    y = torch.randint(0, K, (shape[0],), generator=g)
    gen = torch.Generator()
    cm = featmix.CutMix(K, inplace=True, generator=gen)

    threads = torch.get_num_threads()

    def serial() -> Any:  # the same call without parallel regions (what a one-thread paste would give)
        torch.set_num_threads(1)
        try:
            return cm(x, y)
        finally:
            torch.set_num_threads(threads)

    def phase() -> Dict[str, float]:
        gen.manual_seed(args.seed)  # the same boxes in both phases
        return interleave({"CutMix(inplace)": lambda: cm(x, y), "clone": lambda: x.clone(),
                           "CutMix(inplace) 1 thread": serial}, args.repeats, args.warmup, 1)

    alone = phase()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.2)
        busy = phase()
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    us = {f"{k} alone": v for k, v in alone.items()} | {f"{k} busy": v for k, v in busy.items()}
    return [row(f"contention: CutMix(inplace) {shape}, {torch.get_num_threads()} threads, busy vs alone",
                "busy / alone", busy["CutMix(inplace)"] / alone["CutMix(inplace)"], "<=", 2.0, us),
            row(f"contention: x.clone() {shape} (for scale)", "busy / alone", busy["clone"] / alone["clone"],
                None, None, us),
            row(f"  the same call on 1 thread: busy vs the {threads}-thread call alone", "busy 1 thread / alone",
                busy["CutMix(inplace) 1 thread"] / alone["CutMix(inplace)"], None, None, us),
            row(f"  the same call on 1 thread alone vs on {threads} threads alone", "1 thread / threads",
                alone["CutMix(inplace) 1 thread"] / alone["CutMix(inplace)"], None, None, us)]


def row(name: str, measure: str, value: float, op: Optional[str], bound: Optional[float],
        us: Dict[str, float]) -> Dict[str, Any]:
    met = None if op is None else (value >= bound if op == ">=" else value <= bound)
    return {"row": name, "measure": measure, "value": value, "op": op, "bound": bound, "met": met,
            "us": {k: round(v, 2) for k, v in us.items()}}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line of ``python -m experiments.bench.host``, with --quick's defaults filled in."""
    p = bench_parser(__doc__, "runs/bench/bench_host.json")
    p.add_argument("--repeats", type=int, help="timed samples per contender (default 21, quick 3)")
    p.add_argument("--inner", type=int, help="calls per timed sample (default 200, quick 10)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 21)
    args.inner = args.inner or (10 if args.quick else 200)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run every row, print the table with MET/MISSED, write the JSON; returns its payload."""
    args = parse_args(argv)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)  # host work is one thread's; parallel regions only add noise
    device = torch.device("cpu")
    env_before = environment(device)
    print(f"bench_host on cpu ({env_before['threads']} threads, load {env_before['loadavg']}): medians of "
          f"{args.repeats} interleaved samples of {args.inner} calls; us per call")
    rows = input_rows((16, 3, 8, 8) if args.quick else (64, 3, 8, 8), args, with_floor=True)
    rows += input_rows((32, 3, 32, 32) if args.quick else (256, 3, 32, 32), args, with_floor=False)
    rows += feature_rows(args)
    rows += per_sample_rows(args)
    torch.set_num_threads(default_threads)  # contention: at torch's own thread count
    rows += contention_rows(args)
    cells = []
    for r in rows:
        verdict = "-" if r["met"] is None else ("MET" if r["met"] else "MISSED")
        target = "-" if r["op"] is None else f"{r['op']} {r['bound']:g}"
        cells.append([r["row"], r["measure"], fmt_ratio(r["value"]), target, verdict])
    print(table(["row", "measure", "value", "target", "verdict"], cells))
    payload = {"benchmark": "bench_host", "quick": args.quick, "repeats": args.repeats, "inner": args.inner,
               "warmup": args.warmup, "environment": environment(device) | {"loadavg_before": env_before["loadavg"]},
               "rows": rows}
    return finish(args.out, payload)


if __name__ == "__main__":
    main()
