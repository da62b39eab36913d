"""Timing helpers shared by the featmix speed benchmarks (`experiments.bench.mixing`, `experiments.bench.step`).

The CPU is shared with other jobs, so single timings mean little: every contender is timed many times,
interleaved with its rivals in the same loop (a slow phase of the machine hits all of them), the order
rotated every round (no contender always runs right after the same neighbour), and min / median / max
are reported. Work a contender needs before each call (restoring an input that an in-place op
overwrote) runs untimed in ``setup``; on CUDA the time between two events on the stream is measured.

Hand-written rather than ``torch.utils.benchmark.Timer``: Timer runs a statement in a loop with one
setup per loop (and two warm-up calls per ``timeit``), times CUDA with a host synchronize instead of
events, frees the result inside the clock and sets its own thread count; a call here needs an untimed
setup before every call, interleaving with its rivals, event timing and the caller's threads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..cli import HelpFormatter, add_device_options, resolve_device, set_threads


@dataclass
class Case:
    """One contender: ``fn`` is timed; ``setup`` (untimed) runs right before every call of ``fn``."""

    fn: Callable[[], Any]
    setup: Optional[Callable[[], Any]] = None


@dataclass
class Stats:
    """Milliseconds over ``n`` timed calls."""

    min: float
    median: float
    max: float
    n: int
    samples: List[float] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        """Min / median / max of the samples (ms)."""
        s = list(samples)
        return cls(min(s), statistics.median(s), max(s), len(s), s)

    def as_dict(self, with_samples: bool = False) -> Dict[str, Any]:
        """The stats as a JSON-ready dict (the raw samples only when asked)."""
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call. The result is dropped after the clock stops, so freeing a large output
    is not timed (allocating it is: page faults of a fresh CPU allocation are part of any out-of-place op)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
    else:
        t0 = time.perf_counter()
        result = fn()
        ms = (time.perf_counter() - t0) * 1e3
    del result
    return ms


def rotating_rounds(names: Sequence[str], rounds: int) -> Iterator[Tuple[int, str]]:
    """(round, name) for ``rounds`` rounds of every name, the order rotated by one each round."""
    names = list(names)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            yield r, name


def interleaved(cases: Mapping[str, Case], repeats: int, warmup: int, device: torch.device) -> Dict[str, Stats]:
    """Time every case ``repeats`` times after ``warmup`` untimed rounds, interleaved in rotating order."""
    samples: Dict[str, List[float]] = {n: [] for n in cases}
    for r, name in rotating_rounds(list(cases), warmup + repeats):
        case = cases[name]
        if case.setup is not None:
            case.setup()
        synchronize(device)
        ms = time_call(case.fn, device)
        if r >= warmup:
            samples[name].append(ms)
    return {n: Stats.of(s) for n, s in samples.items()}


def environment(device: torch.device) -> Dict[str, Any]:
    """What the numbers depend on: versions, threads, the machine's load while measuring."""
    env: Dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import timm
        import torchvision
        env["timm"], env["torchvision"] = timm.__version__, torchvision.__version__
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def bench_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options both benchmarks take (device, threads, --quick, warm-up, layout, classes, seed, output)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=HelpFormatter)
    add_device_options(p, default="cpu")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run for tests")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 3, quick 1)")
    p.add_argument("--channels-last", action="store_true", help="run on channels_last tensors")
    p.add_argument("--num-classes", type=int, default=100, help="classes of the labels / the model's head")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs, labels and initial weights")
    p.add_argument("--out", default=out, help="JSON file the results are written to")
    return p


def start(args: argparse.Namespace) -> Tuple[argparse.Namespace, torch.device]:
    """Apply --threads and resolve --device for a benchmark run -> (args, device)."""
    set_threads(args.threads)
    return args, resolve_device(args.device)


def finish(out: str, payload: Dict[str, Any]) -> Dict[str, Any]:
    """Write the run's JSON to `out`, say where; returns the payload."""
    print(f"\nwrote {write_json(out, payload)}")
    return payload


def fmt_ms(ms: float) -> str:
    """Milliseconds with three significant-ish digits."""
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_ratio(r: Optional[float]) -> str:
    """A ratio with two decimals, '-' when missing or not finite."""
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_json(path: str, payload: Dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path`` (parents created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return p


__all__ = ["Case", "Stats", "interleaved", "rotating_rounds", "time_call", "synchronize", "environment",
           "bench_parser", "start", "finish", "fmt_ms", "fmt_ratio", "table", "write_json"]
