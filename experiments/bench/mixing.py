"""Speed of one CutMix of a batch: featmix against timm, torchvision, the reference code and a copy.

``python -m experiments.bench.mixing [--quick] [--device cuda] [--out runs/bench/bench_mixing.json]``

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
import sys
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import featmix
import featmix.functional as FF

from .common import Case, Stats, bench_parser, environment, finish, fmt_ms, fmt_ratio, interleaved, start, table

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


class FixedBoxSampler(featmix.MixSampler):
    """featmix's own draw (same random values consumed, same cost), with lam and the centre pinned so the
    box is the one every other contender pastes; `perm`, when given, pins the partners too."""

    def __init__(self, generator: torch.Generator, perm: Optional[torch.Tensor] = None) -> None:
        super().__init__(generator=generator)
        self.pinned_perm = perm

    def draw(self, batch_size: int, num_sites: int = 1) -> featmix.MixDraw:
        """The parent's draw for `batch_size` samples, with lam = LAM and centre = CENTER (and the pinned perm)."""
        d = super().draw(batch_size, num_sites)
        perm = d.perm if self.pinned_perm is None else self.pinned_perm
        return featmix.MixDraw(mixed=d.mixed, lam=LAM, center=CENTER, perm=perm, site=d.site, variant=d.variant)


def fixed_box(h: int, w: int) -> Tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of the pinned draw on an h x w grid (the reference rule)."""
    return featmix.box_on_grid(LAM, CENTER, h, w)


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


class Buffers:
    """The tensors every contender works on: ``buf`` (restored from ``src`` before each call), the pinned
    box and partners, a preallocated output, an upstream gradient and a leaf sharing ``buf``'s storage."""

    def __init__(self, src: torch.Tensor, seed: int) -> None:
        B, _, H, W = src.shape
        g = torch.Generator().manual_seed(seed)
        self.src, self.box = src, fixed_box(H, W)
        self.perm_cpu = torch.randperm(B, generator=g)
        self.perm = self.perm_cpu.to(src.device)
        self.inv = FF.inverse_permutation(self.perm_cpu).to(src.device)
        self.buf = src.clone()
        self.out = torch.empty_like(src)
        self.grad_out = torch.empty_like(src).copy_(torch.randn(src.shape, generator=g))  # same layout as src
        self.leaf = self.buf.detach().requires_grad_(True)  # shares buf's storage: restored with it

    def restore(self) -> None:
        """Copy the pristine input back (in-place contenders overwrite it)."""
        self.buf.copy_(self.src)

    def ref_inplace(self) -> torch.Tensor:
        """The reference code's paste, in place."""
        y1, y2, x1, x2 = self.box
        self.buf[:, :, y1:y2, x1:x2] = self.buf[self.perm, :, y1:y2, x1:x2]
        return self.buf

    def ref_clone_paste(self, x: torch.Tensor) -> torch.Tensor:
        """The reference code's paste, out of place (clone, then the box from the partners)."""
        y1, y2, x1, x2 = self.box
        o = x.clone()
        o[:, :, y1:y2, x1:x2] = x[self.perm, :, y1:y2, x1:x2]
        return o

    def grad_of(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], Any]:
        """A call that runs ``f`` forward on the leaf and backward with the fixed upstream gradient."""
        return lambda: torch.autograd.grad(f(self.leaf), self.leaf, self.grad_out)


def featmix_contenders(b: Buffers, labels: torch.Tensor, num_classes: int, seed: int) -> Dict[str, Any]:
    """featmix's modules on the pinned draw: CutMix in and out of place, one FeatureCutMix under `mixing`."""
    cm_inplace = featmix.CutMix(num_classes, inplace=True)
    cm_inplace.sampler = FixedBoxSampler(torch.Generator().manual_seed(seed))
    cm_oop = featmix.CutMix(num_classes)
    cm_oop.sampler = FixedBoxSampler(torch.Generator().manual_seed(seed))
    site = featmix.FeatureCutMix().train()
    site_sampler = FixedBoxSampler(torch.Generator().manual_seed(seed), perm=b.perm_cpu)

    def feature_forward() -> torch.Tensor:  # the public per-batch path: draw, arm, paste, targets, disarm
        with featmix.mixing([site], labels, num_classes, sampler=site_sampler):
            return site(b.buf)

    return {"cm_inplace": cm_inplace, "cm_oop": cm_oop, "feature_forward": feature_forward}


def build_cases(src: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int
                ) -> Tuple[Dict[str, Case], Dict[str, Any]]:
    """All contenders on one buffer restored from ``src`` before each call, and what the sanity check needs."""
    import timm.data

    b = Buffers(src, seed)
    fm = featmix_contenders(b, labels, num_classes, seed)
    mixup = timm.data.Mixup(mixup_alpha=0., cutmix_alpha=1., mode="batch", label_smoothing=0,
                            num_classes=num_classes)
    tv = torchvision_fixed_box(num_classes, b.box, src.shape[2], src.shape[3])
    masked_box = torch.tensor(b.box, device=src.device)
    fns: Dict[str, Callable[[], Any]] = {
        "clone": lambda: b.buf.clone(),
        "copy_": lambda: b.out.copy_(b.buf),
        "featmix.CutMix(inplace)": lambda: fm["cm_inplace"](b.buf, labels),
        "paste_box_": lambda: FF.paste_box_(b.buf, b.perm, b.box),
        "ref inplace": b.ref_inplace,
        "timm Mixup": lambda: mixup(b.buf, labels),
        "featmix.CutMix": lambda: fm["cm_oop"](b.buf, labels),
        "paste_box": lambda: FF.paste_box(b.buf, b.perm, b.box, inv_perm=b.inv),
        "FeatureCutMix": fm["feature_forward"],
        "paste_box_masked": lambda: FF.paste_box_masked(b.buf, b.perm, masked_box),
        "ref clone+paste": lambda: b.ref_clone_paste(b.buf),
        "tv v2.CutMix": lambda: tv(b.buf, labels),
        "clone fwd+bwd": b.grad_of(lambda t: t.clone()),
        "paste_box fwd+bwd": b.grad_of(lambda t: FF.paste_box(t, b.perm, b.box, inv_perm=b.inv)),
        "ref fwd+bwd": b.grad_of(b.ref_clone_paste),
    }
    cases = {name: Case(fn, b.restore) for name, fn in fns.items()}
    ctx = {"box": b.box, "buf": b.buf, "restore": b.restore, "cm_inplace": fm["cm_inplace"], "cm_oop": fm["cm_oop"],
           "ref_clone_paste": b.ref_clone_paste, "tv": tv}
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
    """Every contender's timings on one (shape, dtype), after the sanity check."""
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
        ("input in place >= 2x faster than timm Mixup", image_shape, "featmix.CutMix(inplace)", "timm Mixup", ">=",
         2.0),
        ("input in place >= 3x faster than torchvision v2.CutMix", image_shape, "featmix.CutMix(inplace)",
         "tv v2.CutMix", ">=", 3.0),
        ("feature mixing forward <= %.1fx x.clone()" % (1.3 if device.type == "cpu" else 1.1), feature_shape,
         "paste_box", "clone", "<=", 1.3 if device.type == "cpu" else 1.1),
        ("FeatureCutMix under featmix.mixing (draw, arm, mix, targets) <= %.1fx x.clone()"
         % (1.3 if device.type == "cpu" else 1.1),
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
    """argparse type: 'BxCxHxW' -> a 4-tuple of ints."""
    shape = tuple(int(v) for v in s.lower().split("x"))
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f"shape must be BxCxHxW, got {s!r}")
    return shape


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line of ``python -m experiments.bench.mixing``, with --quick's defaults filled in."""
    p = bench_parser(__doc__, "runs/bench/bench_mixing.json")
    p.add_argument("--shapes", type=lambda s: [parse_shape(v) for v in s.split(",")], default=None,
                   help="comma-separated BxCxHxW (default: the four benchmark shapes)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated of fp32, bf16, fp16")
    p.add_argument("--repeats", type=int, help="timed calls per contender (default 25, quick 5)")
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
    """Run the benchmark, print the tables and the targets, write the JSON; returns its payload."""
    args, device = start(parse_args(argv))
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
    return finish(args.out, payload)


if __name__ == "__main__":
    main()
