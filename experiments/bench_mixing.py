"""Speed of one CutMix of a batch: featmix against timm, torchvision, the reference code and a copy.

``python -m experiments.bench_mixing [--quick] [--device cuda] [--out runs/bench/bench_mixing.json]``

Why it is built this way: the numbers are only comparable if every contender does the same work on the
same tensor in the same process. So every contender gets the same box (lam = 0.5, centre at the grid
centre, forced into each library's own draw), reads the same buffer, and that buffer is restored from
a pristine copy before every call, untimed, for all contenders alike (in-place ops overwrite it). The
contenders are interleaved in rotating order and repeated; min / median / max are reported and the
ratios use medians. Two floors: ``x.clone()`` (a fresh allocation: on CPU the page faults of the new
memory can cost several times the copy, depending on size and the machine's state) and
``out.copy_(x)`` into a preallocated buffer (memory traffic only).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import featmix
import featmix.functional as FF
from featmix import MixDraw, MixSampler, box_on_grid

from .bench_common import (Case, Stats, environment, fmt_ms, fmt_ratio, interleaved, resolve_device,
                           set_threads, table, write_json)

FULL_SHAPES = [(64, 3, 224, 224), (128, 64, 56, 56), (256, 256, 14, 14), (256, 3, 32, 32)]
QUICK_SHAPES = [(8, 3, 64, 64), (16, 32, 14, 14)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAM, CENTER = 0.5, (0.5, 0.5)

# contender -> kind; each kind is compared with its own reference-code contender (REF_OF_KIND)
KINDS = {
    "clone": "floor", "copy_": "floor",
    "featmix.CutMix(inplace)": "in place", "paste_box_": "in place", "ref inplace": "in place",
    "timm Mixup": "in place",
    "featmix.CutMix": "out of place", "paste_box": "out of place", "FeatureCutMix": "out of place",
    "paste_box_masked": "out of place", "ref clone+paste": "out of place", "tv v2.CutMix": "out of place",
    "clone fwd+bwd": "fwd+bwd", "paste_box fwd+bwd": "fwd+bwd", "ref fwd+bwd": "fwd+bwd",
}
REF_OF_KIND = {"in place": "ref inplace", "out of place": "ref clone+paste", "fwd+bwd": "ref fwd+bwd",
               "floor": "ref clone+paste"}


class FixedBoxSampler(MixSampler):
    """featmix's own draw (same random values consumed, same permutation stream, same cost), with lam
    and the centre pinned so the box is the one every other contender pastes."""

    def draw(self, batch_size: int, num_sites: int = 1) -> MixDraw:
        return dataclasses.replace(super().draw(batch_size, num_sites), lam=LAM, center=CENTER)


class PinnedSampler(MixSampler):
    """Hands out one given draw every time (the FeatureCutMix contender pastes the pinned box)."""

    def __init__(self, pinned: MixDraw) -> None:
        super().__init__()
        self.pinned = pinned

    def draw(self, batch_size: int, num_sites: int = 1) -> MixDraw:
        return self.pinned


def fixed_box(h: int, w: int) -> Tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of the pinned draw on an h x w grid (the reference rule)."""
    return box_on_grid(LAM, CENTER, h, w)


@contextmanager
def timm_fixed_box(box: Tuple[int, int, int, int]) -> Iterator[None]:
    """timm's Mixup draws lam and calls ``rand_bbox``; pin the box (its lam correction still runs)."""
    import timm.data.mixup as tm

    orig = tm.rand_bbox
    tm.rand_bbox = lambda img_shape, lam, margin=0., count=None: box
    try:
        yield
    finally:
        tm.rand_bbox = orig


def torchvision_fixed_box(num_classes: int, box: Tuple[int, int, int, int], h: int, w: int) -> Any:
    """torchvision v2.CutMix whose own draw runs (Beta sample, randint) but whose box is pinned."""
    from torchvision.transforms import v2

    y1, y2, x1, x2 = box

    class PinnedCutMix(v2.CutMix):
        def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
            params = super().make_params(flat_inputs)
            params["box"] = (x1, y1, x2, y2)
            params["lam_adjusted"] = 1.0 - (x2 - x1) * (y2 - y1) / float(w * h)
            return params

    return PinnedCutMix(num_classes=num_classes, alpha=1.0)


def build_cases(src: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int
                ) -> Tuple[Dict[str, Case], Dict[str, Any]]:
    """All contenders on one buffer ``buf`` restored from ``src`` before each call."""
    import timm.data

    B, _, H, W = src.shape
    device = src.device
    box = fixed_box(H, W)
    y1, y2, x1, x2 = box
    g = torch.Generator().manual_seed(seed)
    perm_cpu = torch.randperm(B, generator=g)
    perm = perm_cpu.to(device)
    inv = FF.inverse_permutation(perm_cpu).to(device)
    buf = src.clone()
    out = torch.empty_like(src)
    grad_out = torch.empty_like(src).copy_(torch.randn(src.shape, generator=g))  # same layout as src
    leaf = buf.detach().requires_grad_(True)  # shares buf's storage: restored with it

    def restore() -> None:
        buf.copy_(src)

    cm_inplace = featmix.CutMix(num_classes, inplace=True)
    cm_inplace.sampler = FixedBoxSampler(generator=torch.Generator().manual_seed(seed))
    cm_oop = featmix.CutMix(num_classes)
    cm_oop.sampler = FixedBoxSampler(generator=torch.Generator().manual_seed(seed))
    mixup = timm.data.Mixup(mixup_alpha=0., cutmix_alpha=1., mode="batch", label_smoothing=0,
                            num_classes=num_classes)
    tv = torchvision_fixed_box(num_classes, box, H, W)
    site = featmix.FeatureCutMix().train()
    draw = MixDraw(mixed=True, lam=LAM, center=CENTER, perm=perm_cpu, site=0)

    def ref_inplace() -> torch.Tensor:
        buf[:, :, y1:y2, x1:x2] = buf[perm, :, y1:y2, x1:x2]
        return buf

    def ref_clone_paste(x: torch.Tensor) -> torch.Tensor:
        o = x.clone()
        o[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
        return o

    pinned = PinnedSampler(draw)

    def feature_forward() -> torch.Tensor:
        with featmix.mixing([site], labels, num_classes, sampler=pinned):
            return site(buf)

    def grad_of(f) -> Any:
        def run() -> Any:
            return torch.autograd.grad(f(leaf), leaf, grad_out)
        return run

    masked_box = torch.tensor(box, device=device)
    cases = {
        "clone": Case(lambda: buf.clone(), restore),
        "copy_": Case(lambda: out.copy_(buf), restore),
        "featmix.CutMix(inplace)": Case(lambda: cm_inplace(buf, labels), restore),
        "paste_box_": Case(lambda: FF.paste_box_(buf, perm, box), restore),
        "ref inplace": Case(ref_inplace, restore),
        "timm Mixup": Case(lambda: mixup(buf, labels), restore),
        "featmix.CutMix": Case(lambda: cm_oop(buf, labels), restore),
        "paste_box": Case(lambda: FF.paste_box(buf, perm, box, inv_perm=inv), restore),
        "FeatureCutMix": Case(feature_forward, restore),
        "paste_box_masked": Case(lambda: FF.paste_box_masked(buf, perm, masked_box), restore),
        "ref clone+paste": Case(lambda: ref_clone_paste(buf), restore),
        "tv v2.CutMix": Case(lambda: tv(buf, labels), restore),
        "clone fwd+bwd": Case(grad_of(lambda t: t.clone()), restore),
        "paste_box fwd+bwd": Case(grad_of(lambda t: FF.paste_box(t, perm, box, inv_perm=inv)), restore),
        "ref fwd+bwd": Case(grad_of(ref_clone_paste), restore),
    }
    ctx = {"box": box, "perm": perm, "buf": buf, "restore": restore, "cm_inplace": cm_inplace, "cm_oop": cm_oop,
           "ref_clone_paste": ref_clone_paste, "tv": tv, "mixup": mixup}
    return cases, ctx


def sanity_check(cases: Dict[str, Case], ctx: Dict[str, Any], src: torch.Tensor, labels: torch.Tensor) -> None:
    """Before timing: featmix's contenders paste exactly the pinned box, and equal the reference."""
    box, buf, restore = ctx["box"], ctx["buf"], ctx["restore"]
    restore()
    want = ctx["ref_clone_paste"](buf)
    for name in ("paste_box", "FeatureCutMix"):
        restore()
        got = cases[name].fn()
        if not torch.equal(got, want):
            raise AssertionError(f"{name} differs from the reference clone-then-paste")
    restore()
    if not torch.equal(cases["paste_box_"].fn(), want):
        raise AssertionError("paste_box_ differs from the reference")
    restore()
    masked = cases["paste_box_masked"].fn()
    if not torch.equal(masked, want):
        raise AssertionError("paste_box_masked differs from the reference")
    for name, module in (("featmix.CutMix(inplace)", ctx["cm_inplace"]), ("featmix.CutMix", ctx["cm_oop"])):
        restore()
        cases[name].fn()
        if module.last_mix is None or tuple(module.last_mix.box) != tuple(box):
            raise AssertionError(f"{name} pasted {module.last_mix and module.last_mix.box}, not the pinned {box}")
    restore()
    _, t = ctx["tv"](buf, labels)
    y1, y2, x1, x2 = box
    lam = 1.0 - (y2 - y1) * (x2 - x1) / float(src.shape[-2] * src.shape[-1])
    oh = torch.nn.functional.one_hot(labels, t.shape[1]).float()
    if not torch.allclose(t, oh * lam + oh.roll(1, 0) * (1 - lam)):
        raise AssertionError("torchvision's pinned box did not give the expected label weight")
    restore()


def bench_one(shape: Sequence[int], dtype: torch.dtype, device: torch.device, args: argparse.Namespace
              ) -> Dict[str, Stats]:
    g = torch.Generator().manual_seed(args.seed)
    src = torch.randn(tuple(shape), generator=g).to(device=device, dtype=dtype)
    if args.channels_last:
        src = src.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(args.num_classes, (shape[0],), generator=g).to(device)
    cases, ctx = build_cases(src, labels, args.num_classes, args.seed)
    with timm_fixed_box(ctx["box"]):
        sanity_check(cases, ctx, src, labels)
        return interleaved(cases, args.repeats, args.warmup, device)


def rows_for(stats: Dict[str, Stats]) -> Tuple[List[List[str]], List[Dict[str, Any]]]:
    """Table rows and JSON records with ratios to the floors and to the peers (all on medians)."""
    med = {k: s.median for k, s in stats.items()}
    rows, records = [], []
    for name, s in stats.items():
        kind = KINDS[name]
        ref = REF_OF_KIND[kind]
        r = {
            "contender": name, "kind": kind, **s.as_dict(),
            "x_clone": s.median / med["clone"], "x_copy": s.median / med["copy_"],
            # speed-up of this contender over each peer: > 1 means this one is faster
            "speedup_vs_timm": med["timm Mixup"] / s.median,
            "speedup_vs_torchvision": med["tv v2.CutMix"] / s.median,
            "speedup_vs_ref": med[ref] / s.median, "ref": ref,
        }
        records.append(r)
        rows.append([name, kind, fmt_ms(s.median), fmt_ms(s.min), fmt_ms(s.max), fmt_ratio(r["x_clone"]),
                     fmt_ratio(r["x_copy"]), fmt_ratio(r["speedup_vs_timm"]), fmt_ratio(r["speedup_vs_torchvision"]),
                     f"{fmt_ratio(r['speedup_vs_ref'])} ({ref.split()[-1]})"])
    return rows, records


HEADER = ["contender", "kind", "median ms", "min", "max", "x clone", "x copy_", "timm/this", "tv/this",
          "ref/this"]


def check_targets(results: List[Dict[str, Any]], device: torch.device, image_shape: Sequence[int],
                  feature_shape: Sequence[int]) -> List[Dict[str, Any]]:
    """DESIGN.md's performance targets, evaluated on this run's medians (fp32)."""
    def med(shape: Sequence[int], name: str) -> Optional[float]:
        for res in results:
            if list(res["shape"]) == list(shape) and res["dtype"] == "fp32":
                for r in res["contenders"]:
                    if r["contender"] == name:
                        return r["median"]
        return None

    specs = [
        ("input in place >= 2x faster than timm Mixup", image_shape, "featmix.CutMix(inplace)", "timm Mixup", ">=", 2.0),
        ("input in place >= 3x faster than torchvision v2.CutMix", image_shape, "featmix.CutMix(inplace)",
         "tv v2.CutMix", ">=", 3.0),
        ("feature mixing forward <= %.1fx x.clone()" % (1.3 if device.type == "cpu" else 1.1), feature_shape,
         "paste_box", "clone", "<=", 1.3 if device.type == "cpu" else 1.1),
        ("FeatureCutMix forward (arm + mix) <= %.1fx x.clone()" % (1.3 if device.type == "cpu" else 1.1),
         feature_shape, "FeatureCutMix", "clone", "<=", 1.3 if device.type == "cpu" else 1.1),
    ]
    out = []
    for label, shape, this, peer, op, bound in specs:
        a, b = med(shape, this), med(shape, peer)
        if a is None or b is None:
            out.append({"target": label, "shape": list(shape), "measured": None, "bound": bound, "met": None})
            continue
        ratio = b / a if op == ">=" else a / b  # speed-up over the peer, or time relative to the floor
        out.append({"target": label, "shape": list(shape), "dtype": "fp32", "contender": this, "peer": peer,
                    "measured": ratio, "op": op, "bound": bound,
                    "met": ratio >= bound if op == ">=" else ratio <= bound})
    return out


def parse_shape(s: str) -> Tuple[int, ...]:
    shape = tuple(int(v) for v in s.lower().split("x"))
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f"shape must be BxCxHxW, got {s!r}")
    return shape


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (CUDA timings use CUDA events)")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run for tests")
    p.add_argument("--shapes", type=lambda s: [parse_shape(v) for v in s.split(",")], default=None,
                   help="comma-separated BxCxHxW (default: the four benchmark shapes)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated of fp32, bf16, fp16")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per contender (default 25, quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--channels-last", action="store_true", help="run on channels_last tensors")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/bench_mixing.json")
    args = p.parse_args(argv)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    args.repeats = args.repeats or (5 if args.quick else 25)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.quick:  # one thread: on a busy shared CPU every parallel region can wait a scheduler slice
        args.threads = args.threads or 1
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            p.error(f"--dtypes: unknown {d!r}; choose from {', '.join(DTYPES)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    env_before = environment(device)
    fixed = (f"every contender pastes the same box: lam={LAM}, centre=(H//2, W//2) -> featmix's rule "
             f"(cut=int(side*sqrt(1-lam)), half-sides cut//2), e.g. {fixed_box(224, 224)} (y1,y2,x1,x2) on 224x224; "
             f"timm: rand_bbox patched to that box (its lam draw and correction run); torchvision: its make_params "
             f"runs, then box/lam replaced; featmix.CutMix: its sampler draws, then lam/centre pinned. Partners: "
             f"featmix and the reference use a random permutation, timm flip(0), torchvision roll(1). The input "
             f"buffer is restored (untimed) before every call of every contender.")
    print(f"bench_mixing on {device} ({env_before['threads']} threads, load {env_before['loadavg']}): "
          f"median of {args.repeats} interleaved calls after {args.warmup} warm-up rounds; ms")
    print(f"fixed: {fixed}")
    print("columns: 'x clone'/'x copy_' = median time / floor's median; 'timm/this', 'tv/this', 'ref/this' = "
          "peer's median / this median (> 1: this is faster)\n")
    results = []
    for shape in args.shapes:
        for dname in args.dtypes.split(","):
            stats = bench_one(shape, DTYPES[dname], device, args)
            rows, records = rows_for(stats)
            layout = ", channels_last" if args.channels_last else ""
            print(f"== {tuple(shape)} {dname}{layout}  box {fixed_box(shape[2], shape[3])}")
            print(table(HEADER, rows) + "\n")
            sys.stdout.flush()
            results.append({"shape": list(shape), "dtype": dname, "box": list(fixed_box(shape[2], shape[3])),
                            "contenders": records})
    image_shape = args.shapes[0] if args.quick else FULL_SHAPES[0]
    feature_shape = args.shapes[min(1, len(args.shapes) - 1)] if args.quick else FULL_SHAPES[1]
    targets = check_targets(results, device, image_shape, feature_shape)
    print("targets (DESIGN.md; fp32, medians of this run):")
    for t in targets:
        m = "not measured" if t["measured"] is None else (
            f"{t['measured']:.2f} (need {t['op']} {t['bound']}): {'MET' if t['met'] else 'MISSED'}")
        print(f"  {t['target']} on {tuple(t['shape'])}: {m}")
    payload = {"benchmark": "bench_mixing", "quick": args.quick, "device": str(device),
               "channels_last": args.channels_last, "repeats": args.repeats, "warmup": args.warmup,
               "fixed": fixed, "environment": environment(device) | {"loadavg_before": env_before["loadavg"]},
               "results": results, "targets": targets}
    path = write_json(args.out, payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
