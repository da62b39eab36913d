"""The fast path of the studies: what is on by default per device, torch.compile, and compile-time accounting.

On CUDA the studies default to bf16 autocast, channels_last and `torch.compile` with CUDA graphs
(`mode="reduce-overhead"`; plain `"default"` under DistributedDataParallel, whose gradient hooks CUDA
graphs do not capture); each has an opt-out flag. On a CPU all of them stay off unless asked for, so the
default CPU study is the one it always was.

Compilation is shared across runs: dynamo keeps compiled graphs on the code objects of the model's
classes, guarded on shapes and module structure rather than on the instance, so a fresh model of the same
architecture (the next seed, or a setting mixing at the same layer) reuses the graphs of the first and only
a new structure (another mixing layer) or batch shape compiles. A study compiles one graph set per
(setting structure, batch shape); `allow_recompiles` raises dynamo's per-function limit so that the sets of
several settings fit (at the default limit of 8 a depth ablation's fifth layer fell back to eager).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# graphs dynamo may keep per function: a study's settings each add a few (train shapes, eval shapes)
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class Speed:
    """The resolved speed switches of a run (none changes what is measured except `amp`, which is hashed)."""

    amp: bool
    channels_last: bool
    compile: bool
    compile_mode: str
    compile_backend: str = "inductor"


def fast_defaults(device_type: str, amp: bool | None = None, channels_last: bool | None = None,
                  compile: bool | None = None, compile_mode: str = "auto", compile_backend: str = "inductor",
                  world_size: int = 1) -> Speed:
    """Resolve the switches left unset (None): on with CUDA, off elsewhere; 'auto' mode: CUDA graphs when alone."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"--compile-mode: expected one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    if compile_backend not in COMPILE_BACKENDS:
        raise ValueError(f"--compile-backend: expected one of {', '.join(COMPILE_BACKENDS)}, got {compile_backend!r}")
    cuda = device_type == "cuda"
    if compile_mode == "auto":
        compile_mode = "reduce-overhead" if cuda and world_size == 1 else "default"
    return Speed(amp=cuda if amp is None else bool(amp),
                 channels_last=cuda if channels_last is None else bool(channels_last),
                 compile=cuda if compile is None else bool(compile),
                 compile_mode=compile_mode, compile_backend=compile_backend)


def uses_cuda_graphs(compile: bool, compile_mode: str, compile_backend: str) -> bool:
    """Whether compiled calls replay CUDA graphs (inductor's reduce-overhead and max-autotune modes)."""
    return (compile and compile_backend == "inductor"
            and compile_mode in ("reduce-overhead", "max-autotune"))


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Let dynamo keep `limit` graphs per function (never lowers a larger limit already set)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), limit))


def compile_module(module: nn.Module, mode: str, backend: str) -> nn.Module:
    """torch.compile with static shapes (each batch shape its own graph: what CUDA graphs replay best)."""
    allow_recompiles()
    # A study compiles the plain model and, later, wrapped copies of the same class whose mixing layers are
    # forward hooks: Dynamo must guard on hooks, or a plain graph may serve a wrapped model (featmix would
    # then stop with "did not mix this batch"). A study owns its process; the guard costs little.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    if backend == "inductor":
        return torch.compile(module, mode=None if mode == "default" else mode, dynamic=False)
    return torch.compile(module, backend=backend, dynamic=False)


def mark_step(cuda_graphs: bool) -> None:
    """Tell CUDA-graph trees a new iteration begins (outputs of the previous one may then be overwritten)."""
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


class CompileClock:
    """Host time of the calls during which dynamo compiled (their whole wall time), and how many graphs."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seconds = 0.0
        self.graphs = 0
        self.images = 0

    @contextlib.contextmanager
    def call(self, images: int = 0) -> Iterator[None]:
        """Time one call; if it compiled, its time and images count as compilation, not as training."""
        if not self.enabled:
            yield
            return
        before, t0 = graphs_compiled(), time.perf_counter()
        yield
        new = graphs_compiled() - before
        if new:
            self.seconds += time.perf_counter() - t0
            self.graphs += new
            self.images += images

    def state_dict(self) -> dict[str, Any]:
        """The totals (kept across a resume)."""
        return {"seconds": self.seconds, "graphs": self.graphs, "images": self.images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the totals of `state_dict`."""
        self.seconds, self.graphs, self.images = state["seconds"], state["graphs"], state["images"]
