"""``FeatureCutMix``: CutMix as a layer (a *site*); the identity unless a forward pass armed it.

A site is armed by the pass that drives it (``featmix.mixing`` or ``CutMixAt``, see ``arming.py``):
the pass hands the chosen site the batch's draw and marks itself live for the duration of the
forward. While live, the chosen site places the draw on its own grid, pastes once and records the
placement. After the forward, the record stays only so that a recomputed forward (activation
checkpointing, which reruns the site inside backward) replays exactly the same mix; any other call
after the forward is the identity, so a draw never outlives the forward that armed it.

State lives in plain attributes of persistent modules (the draw, one device buffer that keeps its
storage across steps, the record): under ``torch.compile`` that gives guards on a few Python values
and on tensor metadata only, so no batch triggers a recompile.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from .paste import paste
from .placement import Placement, Rule, place_tensor
from .sampling import MixDraw
from .transfer import load_draw, unpack_draw

try:  # torch >= 2.3
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # pragma: no cover - torch 2.1/2.2
    from torch._dynamo import is_compiling as _is_compiling

GridFn = Callable[[Tuple[int, int]], Tuple[int, int]]


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1


class FeatureCutMix(nn.Module):
    """CutMix on the output of the previous layer; the identity in eval mode or when not armed.

    Works on (B, C, H, W) maps (box on the last two dims, or on ``hw_dims``) and on (B, N, C) token
    sequences: the first ``num_prefix_tokens`` tokens (class/register tokens) are left alone and the
    rest are laid out on ``grid`` (inferred as a square when not given). Mixing is out of place and
    differentiable, so it is safe right after ``nn.ReLU(inplace=True)``.
    """

    def __init__(self, hw_dims: Tuple[int, int] = (-2, -1), num_prefix_tokens: int = 0,
                 grid: Optional[Tuple[int, int]] = None, label: object = None) -> None:
        super().__init__()
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
        self.hw_dims = tuple(hw_dims)
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = tuple(grid) if grid is not None else None
        self.label = label
        self.num_chs: Optional[int] = None      # channels the map must have (from timm feature_info)
        self.grid_fn: Optional[GridFn] = None   # token grid for an input size (dynamic-size ViTs)
        self._owner = None                      # the arming pass that drives this site
        self._draw: Optional[MixDraw] = None    # set on the chosen site only
        self._variant, self._batch = "cutmix", 0  # the armed draw's variant and batch size
        self._rule, self._per_sample = Rule(), False  # its placement rule (constants for compiled graphs)
        self._buf: Optional[Tensor] = None      # the draw on the device (``transfer.load_draw``)
        self._record: Optional[Placement] = None

    # -- driven by arming.py ----------------------------------------------------------------------
    def _arm(self, owner: object, draw: Optional[MixDraw], device: torch.device) -> None:
        self._owner, self._draw, self._record = owner, draw, None
        if draw is not None:
            self._variant, self._batch = draw.variant, draw.perm.numel()
            self._rule, self._per_sample = draw.rule, draw.per_sample_kind
            self._buf = load_draw(self._buf, draw, device)

    @property
    def draw_buffer(self) -> Optional[Tensor]:
        """The device tensor that carries each step's draw; its storage is kept from step to step."""
        return self._buf

    def _release(self) -> None:
        self._owner, self._draw, self._record = None, None, None

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        owner = self._owner
        if owner is None or not self.training:
            return x
        if _is_compiling():  # traced inside the live forward; recomputation happens inside the graph
            if self._draw is None or not owner.live:
                return x
            return self._on_spatial(x, self._paste_traced)
        if owner.live:
            if self._draw is None:
                return x
            if self._record is not None:
                raise RuntimeError(f"the mixing layer {self._name()} ran twice in one forward pass; CutMix mixes "
                                   f"once per batch: choose a module that runs once (a module reused in several "
                                   f"places is not a layer position)")
            return self._on_spatial(x, self._paste_new)
        if _in_backward():  # activation checkpointing recomputes the forward: replay the same mix
            owner.check_replay()
            if self._draw is not None and self._record is not None:
                return self._on_spatial(x, self._paste_recorded)
        return x

    def _on_spatial(self, x: Tensor, paste: Callable[[Tensor, int, int], Tensor]) -> Tensor:
        """Run ``paste(map, hdim, wdim)`` on the spatial part of ``x`` (maps, or tokens on their grid)."""
        self._check(x)
        if self._buf.device != x.device:  # armed on the labels' device (``mixing``); the map lives elsewhere
            self._buf = self._buf.to(x.device, non_blocking=True)
        if x.dim() == 3:
            p = self.num_prefix_tokens
            gh, gw = self._token_grid(x.shape[1] - p)
            mixed = paste(x[:, p:].unflatten(1, (gh, gw)), 1, 2).flatten(1, 2)
            return torch.cat([x[:, :p], mixed], dim=1) if p else mixed
        hdim, wdim = (d % x.dim() for d in self.hw_dims)
        return paste(x, hdim, wdim)

    def _paste_new(self, m: Tensor, hdim: int, wdim: int) -> Tensor:
        if self._draw.samples is None:  # a whole-batch draw: placed on the host, box as Python ints
            self._record = self._draw.place(m.shape[hdim], m.shape[wdim])
        else:  # one placement per sample: computed on the device from the transferred parameters
            self._record = self._place_tensor(m, hdim, wdim)
        return self._paste_recorded(m, hdim, wdim)

    def _paste_recorded(self, m: Tensor, hdim: int, wdim: int) -> Tensor:
        if self._record.grid != (m.shape[hdim], m.shape[wdim]):
            raise RuntimeError(f"the recomputed forward of {self._name()} gave a {m.shape[hdim]}x{m.shape[wdim]} map, "
                               f"the original forward {self._record.grid[0]}x{self._record.grid[1]}")
        perm, inv, _ = unpack_draw(self._buf, m.shape[0])
        return paste(m, self._record, perm, inv, hdim, wdim)

    def _paste_traced(self, m: Tensor, hdim: int, wdim: int) -> Tensor:
        self._record = self._place_tensor(m, hdim, wdim)
        perm, inv, _ = unpack_draw(self._buf, m.shape[0])
        return paste(m, self._record, perm, inv, hdim, wdim)

    def _place_tensor(self, m: Tensor, hdim: int, wdim: int) -> Placement:
        _, _, params = unpack_draw(self._buf, m.shape[0])
        return place_tensor(params, m.shape[hdim], m.shape[wdim], self._variant, self._rule, self._per_sample)

    # -- checks -----------------------------------------------------------------------------------
    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"the mixing layer {self._name()} got a {type(x).__name__}, not a tensor")
        if x.dim() < 3:
            raise ValueError(f"FeatureCutMix needs a (B, C, H, W) map or (B, N, C) tokens; got shape "
                             f"{tuple(x.shape)} at {self._name()}")
        batch = self._batch
        if x.shape[0] != batch:
            raise ValueError(f"the map at {self._name()} has batch size {x.shape[0]}, but the batch was drawn for "
                             f"{batch} labels: pass one label per image")
        if self.num_chs is not None:
            cdim = 2 if x.dim() == 3 else next(d for d in range(1, x.dim())
                                              if d not in {h % x.dim() for h in self.hw_dims})
            if x.shape[cdim] != self.num_chs:
                raise ValueError(f"the map at {self._name()} has shape {tuple(x.shape)}: expected {self.num_chs} "
                                 f"channels on dim {cdim} (from the model's feature_info), got {x.shape[cdim]}; "
                                 f"the layout of this layer's output is not the one its model declares")

    def _token_grid(self, n: int) -> Tuple[int, int]:
        owner = self._owner
        if self.grid_fn is not None and getattr(owner, "image_hw", None) is not None:
            grid = tuple(self.grid_fn(owner.image_hw))
        else:
            grid = self.grid
        if grid is not None and grid[0] * grid[1] == n:
            return grid
        side = math.isqrt(n)
        if grid is None and side * side == n:
            return side, side
        raise ValueError(f"cannot lay {n} tokens (after {self.num_prefix_tokens} prefix tokens) on "
                         f"{'the grid ' + str(grid) if grid else 'a square grid'} at {self._name()}: pass grid=(h, w) "
                         f"or num_prefix_tokens= to FeatureCutMix")

    def _name(self) -> str:
        return f"layer={self.label!r}" if self.label is not None else "FeatureCutMix"

    def extra_repr(self) -> str:
        parts = []
        if self.label is not None:
            parts.append(f"label={self.label!r}")
        if self.num_prefix_tokens:
            parts.append(f"num_prefix_tokens={self.num_prefix_tokens}")
        if self.grid is not None:
            parts.append(f"grid={self.grid}")
        return ", ".join(parts)


def find_sites(model: nn.Module) -> list:
    """The ``FeatureCutMix`` modules of ``model`` in registration order."""
    return [m for m in model.modules() if isinstance(m, FeatureCutMix)]
