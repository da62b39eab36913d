"""``FeatureCutMix``: CutMix as a layer (a *site*); the identity unless a forward pass armed it.

A site holds only its layout (which dims are the grid, prefix tokens, channel count) and what must
outlive a forward for its own reasons: the device buffer that carries each step's draw (its storage is
kept from step to step, as CUDA-graph replay needs). Everything about a forward belongs to the pass
that drives the site (``featmix.arming``): the site asks it whether to paste now (the live forward),
to replay a finished forward's placement (activation checkpointing recomputes inside backward), or to
do nothing. Under ``torch.compile`` the site reads only a few Python values of the pass that stay the
same from batch to batch and the buffer's metadata, so no batch triggers a recompile.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from .kinds import paste, place_tensor
from .placement import Placement
from .transfer import unpack_draw

if TYPE_CHECKING:
    from .arming import MixForward

from torch.compiler import is_compiling as _is_compiling

GridFn = Callable[[Tuple[int, int]], Tuple[int, int]]


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1


# the saved-tensor hooks in force (non-reentrant checkpointing pushes its own); a private query, so without
# it every forward counts as checkpointed
_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda ignore_tracing: True)


def _in_checkpointed_region() -> bool:
    """Whether a forward running now may run again inside a backward: activation checkpointing runs the
    first forward of its region without grad (reentrant) or under its saved-tensor hooks (non-reentrant).
    Also true under other saved-tensor hooks and plain no-grad forwards (then a backward binds for nothing)."""
    return not torch.is_grad_enabled() or _saved_tensor_hooks(False) is not None


class FeatureCutMix(nn.Module):
    """CutMix on the output of the previous layer; the identity in eval mode or when not armed.

    Works on (B, C, H, W) maps (box on the last two dims, or on ``hw_dims``: ``(1, 2)`` for NHWC) and on
    (B, N, C) token sequences: the first ``num_prefix_tokens`` tokens (class/register tokens) are left
    alone and the rest are laid out on ``grid`` (inferred as a square when not given). Mixing is out of
    place and differentiable, so it is safe right after ``nn.ReLU(inplace=True)``.

    Args:
        hw_dims: the two dims of a 4-D map that hold height and width.
        num_prefix_tokens: tokens before the patch tokens of a (B, N, C) sequence, left unmixed.
        grid: (h, w) of the patch tokens; None for a square grid.
        label: the name records and errors give this layer.

    Raises:
        ValueError: a bad argument here; in a mixed forward, a map that does not fit the layout (wrong
            batch size, channels, or a grid that does not scale like the input image).

    Example:
        >>> site = featmix.FeatureCutMix()
        >>> x = torch.randn(2, 3, 4, 4)
        >>> site(x) is x  # not armed: the identity
        True
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
        self.square_tokens = True               # no grid: tokens lie on a square (a hand-built layer's default)
        self._driver = None                     # the pass that arms this site (``arming.MixPass``)
        self._buf: Optional[Tensor] = None      # the draw on a device, storage kept across steps
        self._host_draw: Optional[Tuple[Tensor, Tensor]] = None  # on the CPU: the draw's (perm, params)
        self._params_slot: Optional[Tuple[Tensor, bytearray]] = None  # on the CPU: whole-batch params, refilled
        self._scales_checked: set = set()       # (image hw, map hw) pairs known to scale alike
        self._warned_tiny = False

    @property
    def draw_buffer(self) -> Optional[Tensor]:
        """The device tensor that carries each step's draw; its storage is kept from step to step (None on
        the CPU, where the host draw itself serves)."""
        return self._buf

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_buf"] = state["_host_draw"] = state["_params_slot"] = None  # a copy loads its own draws
        return state

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.mix(x)

    def mix(self, x: Tensor) -> Tensor:
        """``x`` mixed when the pass driving this site says so (see ``featmix.arming``), else ``x``."""
        driver = self._driver
        if driver is None:
            return x
        if _is_compiling():  # traced inside the live forward; recomputation happens inside the graph
            if not self.training or not driver.live or driver.chosen is not self:
                return x
            return self._on_spatial(x, driver.image_hw, self._paste_traced)
        if driver.live:
            if driver.chosen is not self or not self.training:
                return x
            if driver.record is not None:
                raise RuntimeError(f"the mixing layer {self._name()} ran twice in one forward pass; CutMix mixes "
                                   f"once per batch: choose a module that runs once (a module reused in several "
                                   f"places is not a layer position)")
            if _in_checkpointed_region():
                driver.current.recomputable = True  # its backward may run this site again: bind it (arming)
            return self._on_spatial(x, driver.image_hw, self._paste_new)
        if _in_backward():  # checkpointing recomputes a forward: replay that forward's mix (eval mode since or not)
            fwd = driver.replay_for(self)
            if fwd is None:
                return x
            return self._on_spatial(x, fwd.image_hw, lambda m, hdim, wdim: self._paste_recorded(fwd, m, hdim, wdim))
        driver.release(self)  # an unarmed forward: nothing to mix, and a later replay here is not ours
        return x

    def _on_spatial(self, x: Tensor, image_hw: Optional[Tuple[int, int]],
                    paste: Callable[[Tensor, int, int], Tensor]) -> Tensor:
        """Run ``paste(map, hdim, wdim)`` on the spatial part of ``x`` (maps, or tokens on their grid)."""
        self._check(x)
        if x.dim() == 3:
            p = self.num_prefix_tokens
            gh, gw = self._token_grid(x.shape[1] - p, image_hw)
            self._check_scale(image_hw, (gh, gw))
            mixed = paste(x[:, p:].unflatten(1, (gh, gw)), 1, 2).flatten(1, 2)
            return torch.cat([x[:, :p], mixed], dim=1) if p else mixed
        ndim, (h, w) = x.dim(), self.hw_dims
        hdim, wdim = h % ndim, w % ndim
        self._check_scale(image_hw, (x.shape[hdim], x.shape[wdim]))
        return paste(x, hdim, wdim)

    def _paste_new(self, m: Tensor, hdim: int, wdim: int) -> Tensor:
        driver = self._driver
        fwd = driver.current
        own = torch.is_grad_enabled() and m.requires_grad
        perm, inv, params = fwd.unpack(m.shape[0], m.device, own)
        if fwd.draw.samples is None:  # a whole-batch draw: placed on the host, box as Python ints
            where = fwd.draw.place(m.shape[hdim], m.shape[wdim])
        else:  # one placement per sample: computed on the device from the transferred parameters
            where = place_tensor(params, m.shape[hdim], m.shape[wdim], driver.variant, driver.rule, driver.per_sample)
        driver.record = where
        self._warn_if_tiny(where)
        return paste(m, where, perm, inv, hdim, wdim)

    def _paste_recorded(self, fwd: "MixForward", m: Tensor, hdim: int, wdim: int) -> Tensor:
        where = fwd.record
        if where.grid != (m.shape[hdim], m.shape[wdim]):
            raise RuntimeError(f"the recomputed forward of {self._name()} gave a {m.shape[hdim]}x{m.shape[wdim]} map, "
                               f"the original forward {where.grid[0]}x{where.grid[1]}")
        perm, inv, _ = fwd.unpack(m.shape[0], m.device, own=True)
        return paste(m, where, perm, inv, hdim, wdim)

    def _paste_traced(self, m: Tensor, hdim: int, wdim: int) -> Tensor:
        driver = self._driver
        if m.device.type == "cpu":  # the host draw (a whole batch's params: a slot the next draw refills)
            (perm, params), inv = self._host_draw, None
            params = params.clone()
        else:
            perm, inv, params = unpack_draw(self._buf.clone(), m.shape[0])  # a copy: the buffer is refilled
        where = place_tensor(params, m.shape[hdim], m.shape[wdim], driver.variant, driver.rule, driver.per_sample)
        driver.record = where
        return paste(m, where, perm, inv, hdim, wdim)

    # -- checks -----------------------------------------------------------------------------------
    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"the mixing layer {self._name()} got a {type(x).__name__}, not a tensor")
        if x.dim() < 3:
            raise ValueError(f"FeatureCutMix needs a (B, C, H, W) map or (B, N, C) tokens; got shape "
                             f"{tuple(x.shape)} at {self._name()}")
        batch = self._driver.batch
        if x.shape[0] != batch:
            raise ValueError(f"the map at {self._name()} has batch size {x.shape[0]}, but the batch was drawn for "
                             f"{batch} labels: pass one label per image")
        if self.num_chs is not None:
            cdim = 2 if x.dim() == 3 else _channel_dim(x.dim(), self.hw_dims)
            if x.shape[cdim] != self.num_chs:
                raise ValueError(f"the map at {self._name()} has shape {tuple(x.shape)}: expected {self.num_chs} "
                                 f"channels on dim {cdim} (from the model's feature_info), got {x.shape[cdim]}; "
                                 f"the layout of this layer's output is not the one its model declares")

    def _token_grid(self, n: int, image_hw: Optional[Tuple[int, int]]) -> Tuple[int, int]:
        if self.grid_fn is not None and image_hw is not None:
            grid = tuple(self.grid_fn(image_hw))
        else:
            grid = self.grid
        if grid is not None and grid[0] * grid[1] == n:
            return grid
        side = math.isqrt(n)
        if grid is None and self.square_tokens and side * side == n:
            return side, side
        where = "the grid " + str(grid) if grid else ("a square grid" if self.square_tokens else "a grid")
        raise ValueError(f"cannot lay {n} tokens (after {self.num_prefix_tokens} prefix tokens) on {where} at "
                         f"{self._name()}: the model does not declare this layer's token grid; pass grid=(h, w), "
                         f"num_prefix_tokens= or layout= (to CutMixAt, or grid=/num_prefix_tokens= to FeatureCutMix)")

    def _check_scale(self, image_hw: Optional[Tuple[int, int]], grid: Tuple[int, int]) -> None:
        """The grid must scale like the image: one stride for both sides (each side the floor or ceil of
        the image side / stride). Checked once per pair of sizes; skipped when the image is unknown."""
        if image_hw is None:
            return
        compiling = _is_compiling()  # then plain arithmetic on static sizes, no guard on the cache
        if not compiling and (image_hw, grid) in self._scales_checked:
            return
        if not _same_stride(image_hw, grid):
            raise ValueError(f"the map at {self._name()} is laid out as a {grid[0]}x{grid[1]} grid, which does not "
                             f"scale like the {image_hw[0]}x{image_hw[1]} input (no one stride gives both sides): the "
                             f"layout of this layer's output is not the one assumed (hw_dims={self.hw_dims}, "
                             f"num_prefix_tokens={self.num_prefix_tokens}, grid={self.grid}); pass layout= "
                             f"('NCHW', 'NHWC' or 'NLC'), grid= or num_prefix_tokens= to CutMixAt")
        if not compiling:
            self._scales_checked.add((image_hw, grid))

    def _warn_if_tiny(self, where: Placement) -> None:
        """A grid whose shorter side is 1 or 2 never holds a CutMix box under the paper's rule."""
        if self._warned_tiny or where.kind != "cutmix" or not isinstance(where.box, tuple) or min(where.grid) > 2:
            return
        self._warned_tiny = True
        warnings.warn(f"the mixing layer {self._name()} has a {where.grid[0]}x{where.grid[1]} map: the paper's box "
                      f"rule (side = int(side * sqrt(1 - lam)), half-sides side // 2) never pastes a box on a grid "
                      f"whose shorter side is 1 or 2, so this layer trains unmixed; choose an earlier layer or a "
                      f"larger input", stacklevel=3)

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


def _channel_dim(ndim: int, hw_dims: Tuple[int, int]) -> int:
    """The first dim after the batch that is not one of ``hw_dims`` (plain int arithmetic: this runs on
    every mixed batch, and inside compiled graphs)."""
    h, w = hw_dims[0] % ndim, hw_dims[1] % ndim
    d = 1
    while d == h or d == w:
        d += 1
    return d


def _same_stride(image_hw: Tuple[int, int], grid: Tuple[int, int]) -> bool:
    """Whether one real stride s gives each grid side as the floor or ceil of the image side / s."""
    (H, W), (h, w) = image_hw, grid
    if h < 1 or w < 1:
        return False
    # side in {floor(S / s), ceil(S / s)}  <=>  S / (side + 1) < s < S / (side - 1) (open ends; no upper bound at 1)
    lo = max(H / (h + 1), W / (w + 1))
    hi = min(H / (h - 1) if h > 1 else math.inf, W / (w - 1) if w > 1 else math.inf)
    return lo < hi


def find_sites(model: nn.Module) -> list:
    """The ``FeatureCutMix`` modules of ``model`` in registration order.

    Args:
        model: any module.

    Returns:
        A list of its ``FeatureCutMix`` submodules (the candidates ``featmix.mixing`` chooses from).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), featmix.FeatureCutMix(label="a"))
        >>> sites = featmix.find_sites(net)
        >>> len(sites), sites[0].label
        (1, 'a')
    """
    return [m for m in model.modules() if isinstance(m, FeatureCutMix)]
