"""Cost of featmix in a whole training step: a timm model with and without ``CutMixAt(model, layer=k)``.

``python -m experiments.bench.step [--quick] [--device cuda] [--sync-debug] [--out runs/bench/bench_step.json]``

Why it is built this way: an overhead of a few percent is below the drift of a shared machine, so the
variants (the plain model and one wrapper per layer) run in rounds, one step of each per round in
rotating order, and the overhead is the ratio of median step times (and, less sensitive to drift,
the median of the per-round ratios). Every variant starts from the same weights and sees the same
batch. The compiled part counts graphs with a counting backend (one count per graph handed to the
compiler, per variant) so a recompile on any batch after the first few shows up as a number.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import featmix

from .common import (
    Case,
    bench_parser,
    environment,
    finish,
    fmt_ms,
    interleaved,
    rotating_rounds,
    start,
    synchronize,
    table,
    time_call,
)

SETTLE_STEPS = 3  # compiled steps allowed to compile (first call, first backward, first mixed batch)
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it is given, then delegates to a real one."""

    def __init__(self, inner: str) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.name = inner
        self.inner = lookup_backend(inner)
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: List[Any]) -> Callable:
        """Count one graph, compile it with the real backend."""
        self.graphs += 1
        return self.inner(gm, example_inputs)


def make_step(model: nn.Module, mixed: bool, lr: float = 0.01) -> Step:
    """One SGD training step; returns the loss tensor without reading it (no host sync)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if mixed:
            logits, targets = model(x, y)
            loss = F.cross_entropy(logits.float(), targets)
        else:
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def base_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The timm model every variant starts from (seeded weights, the requested memory format, train mode)."""
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=args.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def build_variants(args: argparse.Namespace, device: torch.device,
                   compile_backend: Optional[Dict[str, CountingBackend]]) -> Dict[str, Step]:
    """'plain' and 'layer=k' for each k, all from one set of initial weights (compiled when given backends)."""
    base = base_model(args, device)
    variants = {}
    for name in ["plain"] + [f"layer={k}" for k in args.layers]:
        model = copy.deepcopy(base)
        if name != "plain":
            gen = torch.Generator().manual_seed(args.seed)
            model = featmix.CutMixAt(model, layer=int(name.split("=")[1]), alpha=1.0, generator=gen).train()
        if compile_backend is not None:
            backend = CountingBackend(args.compile_backend)
            compile_backend[name] = backend
            model = torch.compile(model, backend=backend)
        variants[name] = make_step(model, mixed=name != "plain")
    return variants


def autocast(args: argparse.Namespace, device: torch.device) -> Any:
    """bf16 autocast with --amp, else a disabled autocast context."""
    if args.amp:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def run_rounds(variants: Dict[str, Step], x: torch.Tensor, y: torch.Tensor, rounds: int, warmup: int,
               device: torch.device, args: argparse.Namespace,
               after_step: Optional[Callable[[str, int], None]] = None) -> Dict[str, List[float]]:
    """``warmup + rounds`` rounds, one step of every variant per round (rotating order); ms per step."""
    times: Dict[str, List[float]] = {n: [] for n in variants}
    for r, name in rotating_rounds(list(variants), warmup + rounds):
        synchronize(device)
        with autocast(args, device):
            ms = time_call(lambda: variants[name](x, y), device)
        if r >= warmup:
            times[name].append(ms)
        if after_step is not None:
            after_step(name, r)
    return times


def summarise(times: Dict[str, List[float]]) -> List[Dict[str, Any]]:
    """Median step time of each variant and its overhead against 'plain' (ratio of medians and the
    median of per-round ratios, both as percent)."""
    base = times["plain"]
    base_med = statistics.median(base)
    out = []
    for name, t in times.items():
        paired = [a / b for a, b in zip(t, base)]
        out.append({
            "variant": name, "median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "n": len(t),
            "overhead_pct": (statistics.median(t) / base_med - 1.0) * 100.0,
            "paired_overhead_pct": (statistics.median(paired) - 1.0) * 100.0,
        })
    return out


def print_table(title: str, rows: List[Dict[str, Any]], extra: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
    """Print one timing table (with the graph counts of a compiled run when ``extra`` holds them)."""
    header = ["variant", "median ms", "min", "max", "overhead %", "paired %"]
    if extra:
        header += ["graphs", f"graphs after step {SETTLE_STEPS}"]
    body = []
    for r in rows:
        line = [r["variant"], fmt_ms(r["median_ms"]), fmt_ms(r["min_ms"]), fmt_ms(r["max_ms"]),
                f"{r['overhead_pct']:+.1f}", f"{r['paired_overhead_pct']:+.1f}"]
        if extra:
            e = extra[r["variant"]]
            line += [str(e["graphs"]), str(e["graphs_after_settle"])]
        body.append(line)
    print(title)
    print(table(header, body) + "\n")
    sys.stdout.flush()


def feature_maps(args: argparse.Namespace, device: torch.device, x: torch.Tensor) -> Dict[int, torch.Tensor]:
    """The tensor each layer index of ``args.layers`` mixes (the input for 0), from one forward pass."""
    model = base_model(args, device)
    maps: Dict[int, torch.Tensor] = {}
    hooks = []
    for k in args.layers:
        spec = featmix.resolve_layers(model, k)[0]
        if spec.module_name is None:
            maps[k] = x
            continue
        module = model.get_submodule(spec.module_name)
        hooks.append(module.register_forward_hook(lambda m, i, o, k=k: maps.__setitem__(k, o.detach().clone())))
    with torch.no_grad(), autocast(args, device):
        model(x)
    for h in hooks:
        h.remove()
    return maps


def mixing_work(feat: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int) -> Callable[[], Any]:
    """One batch of what CutMixAt adds on ``feat``: draw, arm, paste forward (+ backward), targets, disarm."""
    grad = torch.randn_like(feat)
    site = featmix.FeatureCutMix().train()
    sampler = featmix.MixSampler(generator=torch.Generator().manual_seed(seed))

    def work() -> Any:
        with featmix.mixing([site], y, num_classes, sampler=sampler) as batch:
            out = site(feat)
        g = torch.autograd.grad(out, feat, grad) if feat.requires_grad else None
        return g, batch.targets

    return work


def isolated_mixing_cost(args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor,
                         plain_ms: float) -> List[Dict[str, Any]]:
    """The work ``CutMixAt`` adds to a step, timed alone on each layer's real feature map: draw, arm,
    paste forward (and backward where the map needs a gradient) and the targets. A step's noise on a
    shared CPU is larger than this, so it is the firmer estimate of the overhead."""
    maps = feature_maps(args, device, x)
    for k, feat in maps.items():
        feat.requires_grad_(k != 0)  # the input needs no gradient; feature maps do
    cases = {f"layer={k}": Case(mixing_work(maps[k], y, args.num_classes, args.seed)) for k in args.layers}
    stats = interleaved(cases, repeats=max(5, args.rounds), warmup=2, device=device)
    return [{"variant": name, "feature_shape": list(maps[int(name.split("=")[1])].shape),
             "dtype": str(maps[int(name.split("=")[1])].dtype).replace("torch.", ""),
             "median_ms": st.median, "min_ms": st.min, "max_ms": st.max,
             "pct_of_plain_step": st.median / plain_ms * 100.0} for name, st in stats.items()]


def sync_check(variants: Dict[str, Step], x: torch.Tensor, y: torch.Tensor, steps: int,
               args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """Run ``steps`` steps of every variant under ``set_sync_debug_mode('error')``: any host-device
    sync inside a step raises. Untimed (the timer's own event sync would count)."""
    if device.type != "cuda":
        return {"checked": False, "reason": "not CUDA"}
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            for name, step in variants.items():
                with autocast(args, device):
                    step(x, y)
    except RuntimeError as e:
        return {"checked": True, "ok": False, "error": str(e)[:500]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
        synchronize(device)
    return {"checked": True, "ok": True, "steps_per_variant": steps}


def dynamo_counters() -> Dict[str, Dict[str, int]]:
    """Dynamo's frame/stats counters and the number of graph breaks so far."""
    from torch._dynamo.utils import counters

    return {k: dict(counters[k]) for k in ("stats", "frames") if k in counters} | {
        "graph_breaks": {"total": sum(counters["graph_break"].values())} if "graph_break" in counters else {}}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line of ``python -m experiments.bench.step``, with the device's and --quick's defaults."""
    p = bench_parser(__doc__, "runs/bench/bench_step.json")
    p.add_argument("--model", help="timm model (default resnet18 on CPU, resnet50 on CUDA)")
    p.add_argument("--img", type=int, help="image side (default 64 on CPU, 224 on CUDA)")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--layers", default="0,1,2,3,4", help="CutMixAt layer indices to compare with the plain model")
    p.add_argument("--rounds", type=int, help="timed rounds (default 25, quick 2)")
    p.add_argument("--compile-steps", type=int, help="compiled steps per variant (default 50, quick 4)")
    p.add_argument("--compile-backend",
                   help="torch.compile backend (default aot_eager on CPU, inductor on CUDA, eager with --quick)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile part")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: also run steps under torch.cuda.set_sync_debug_mode('error')")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    return fill_defaults(p.parse_args(argv))


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Options left unset take the device's default, or --quick's tiny one."""
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.model = args.model or "test_resnet"
        args.img = args.img or 32
        args.batch = 8 if args.batch == 64 else args.batch
        args.layers = "2" if args.layers == "0,1,2,3,4" else args.layers
        # one thread: on a busy shared CPU every parallel region can wait a scheduler slice
        args.threads = args.threads or 1
    args.model = args.model or ("resnet50" if cuda else "resnet18")
    args.img = args.img or (224 if cuda else 64)
    args.rounds = args.rounds or (2 if args.quick else 25)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.compile_steps = args.compile_steps or (4 if args.quick else 50)
    # quick: Dynamo's own "eager" backend still captures graphs and guards (what the recompile count
    # needs) without AOT autograd's compile time
    args.compile_backend = args.compile_backend or ("eager" if args.quick else "inductor" if cuda else "aot_eager")
    args.layers = [int(v) for v in args.layers.split(",") if v.strip()]
    return args


def eager_part(args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor,
               payload: Dict[str, Any]) -> None:
    """Time the eager variants, then the mixing work alone; results go into ``payload``."""
    variants = build_variants(args, device, None)
    eager = summarise(run_rounds(variants, x, y, args.rounds, args.warmup, device, args))
    print_table("== eager", eager)
    payload["eager"] = {"rounds": args.rounds, "warmup": args.warmup, "variants": eager}
    plain_ms = next(r["median_ms"] for r in eager if r["variant"] == "plain")
    cost = isolated_mixing_cost(args, device, x, y, plain_ms)
    payload["isolated_mixing"] = cost
    print("== the mixing work alone (draw, arm, paste fwd + bwd, targets) on each layer's feature map, "
          "as % of the plain step's median")
    print(table(["variant", "feature map", "median ms", "min", "max", "% of plain step"],
                [[c["variant"], "x".join(map(str, c["feature_shape"])) + f" {c['dtype']}", fmt_ms(c["median_ms"]),
                  fmt_ms(c["min_ms"]), fmt_ms(c["max_ms"]), f"{c['pct_of_plain_step']:.2f}"] for c in cost]) + "\n")
    if args.sync_debug:
        payload["sync_debug"] = sync_check(variants, x, y, 3, args, device)
        print(f"sync debug (set_sync_debug_mode('error'), 3 steps per variant): {payload['sync_debug']}\n")


def compiled_part(args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor,
                  payload: Dict[str, Any]) -> None:
    """Time the compiled variants and count the graphs each compiles after the first steps."""
    import torch._dynamo as dynamo

    dynamo.reset()
    cfg = dynamo.config
    # The variants share the timm model's code objects: give each its own cache entries.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, knob):
            setattr(cfg, knob, max(getattr(cfg, knob), 8 * (len(args.layers) + 1)))
    before = dynamo_counters()
    backends: Dict[str, CountingBackend] = {}
    cvariants = build_variants(args, device, backends)
    graphs_at: Dict[str, Dict[int, int]] = {n: {} for n in cvariants}

    def record(name: str, r: int) -> None:
        graphs_at[name][r] = backends[name].graphs

    steps = args.compile_steps
    warm = min(SETTLE_STEPS, steps - 1)
    compiled = summarise(run_rounds(cvariants, x, y, steps - warm, warm, device, args, after_step=record))
    graphs = {n: {"graphs": b.graphs, "graphs_after_settle": b.graphs - graphs_at[n][warm - 1] if warm else b.graphs,
                  "graphs_by_step": [graphs_at[n][r] for r in sorted(graphs_at[n])]}
              for n, b in backends.items()}
    print_table(f"== torch.compile(backend={args.compile_backend!r}): {steps} steps per variant, the first {warm} "
                f"untimed (compilation); graphs = graphs handed to the backend", compiled, graphs)
    payload["compiled"] = {"backend": args.compile_backend, "steps": steps, "settle_steps": warm,
                           "variants": compiled, "graphs": graphs,
                           "dynamo_counters_before": before, "dynamo_counters_after": dynamo_counters()}
    if args.sync_debug:
        payload["compiled"]["sync_debug"] = sync_check(cvariants, x, y, 3, args, device)
        print(f"sync debug, compiled: {payload['compiled']['sync_debug']}\n")


def _worst(values: List[float]) -> Optional[float]:
    return max(values) if values else None


def _verdict(value: Optional[float], unit: str) -> str:
    shown = value if value is None else f"{value:{unit}}%"
    return f"{shown} -> {'MET' if value is not None and value < 2.0 else 'MISSED'}"


def target_verdict(payload: Dict[str, Any]) -> Dict[str, Any]:
    """The < 2% overhead target on this run (ratio of medians, paired, isolated) and the recompile count."""
    mixed = [r for r in payload["eager"]["variants"] if r["variant"] != "plain"]
    worst = _worst([r["overhead_pct"] for r in mixed])
    worst_paired = _worst([r["paired_overhead_pct"] for r in mixed])
    worst_isolated = _worst([c["pct_of_plain_step"] for c in payload["isolated_mixing"]])
    target = {"target": "CutMixAt step overhead < 2% (eager)", "worst_overhead_pct": worst,
              "met": None if worst is None else worst < 2.0,
              "worst_paired_overhead_pct": worst_paired,
              "paired_met": None if worst_paired is None else worst_paired < 2.0,
              "worst_isolated_pct": worst_isolated,
              "isolated_met": None if worst_isolated is None else worst_isolated < 2.0}
    if "compiled" in payload:
        late = {n: g["graphs_after_settle"] for n, g in payload["compiled"]["graphs"].items()}
        target["compiled_graphs_after_settle"] = late
        target["no_recompiles_after_settle"] = all(v == 0 for v in late.values())
    print(f"target: overhead < 2%: worst eager overhead (ratio of medians) {_verdict(worst, '+.1f')}; "
          f"worst paired overhead (median of per-round ratios) {_verdict(worst_paired, '+.1f')}; "
          f"worst isolated mixing cost {_verdict(worst_isolated, '.2f')}"
          + (f"; graphs compiled after step {SETTLE_STEPS}: {target['compiled_graphs_after_settle']}"
             if "compiled" in payload else ""))
    return target


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark, print the tables and the verdict, write the JSON; returns its payload."""
    args, device = start(parse_args(argv))
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.img, args.img, generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(args.num_classes, (args.batch,), generator=g).to(device)
    env = environment(device)
    setup = (f"{args.model} num_classes={args.num_classes}, batch {args.batch} x 3 x {args.img} x {args.img}, "
             f"SGD(momentum=0.9), {'bf16 autocast' if args.amp else 'fp32'}"
             f"{', channels_last' if args.channels_last else ''}; CutMixAt(alpha=1, prob=1): every batch mixed, "
             f"a fresh lam/box each step")
    print(f"bench_step on {device} ({env['threads']} threads, load {env['loadavg']}): {setup}")
    print(f"eager: {args.rounds} rounds after {args.warmup} warm-up rounds, one step of each variant per round; "
          f"overhead % = median step / median plain step - 1; paired % = median over rounds of step / plain step - 1\n")
    payload: Dict[str, Any] = {"benchmark": "bench_step", "quick": args.quick, "device": str(device), "setup": setup,
                               "model": args.model, "img": args.img, "batch": args.batch, "layers": args.layers,
                               "environment": env}
    eager_part(args, device, x, y, payload)
    if not args.no_compile:
        compiled_part(args, device, x, y, payload)
    payload["target"] = target_verdict(payload)
    return finish(args.out, payload)


if __name__ == "__main__":
    main()
