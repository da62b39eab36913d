"""The paste with the box as a tensor, for compiled graphs: one gather forward, one gather backward.

Every output element is read once, from the sample it comes from: ``src[i]`` is ``perm[i]`` inside
the box and ``i`` outside, so ``out = gather(x, 0, src)`` reads each element of ``x`` once (against
two reads for ``where(mask, x[perm], x)``), and the gradient is the same gather with the inverse
permutation (no scatter-add). Shapes are static and values live in tensors, so one graph serves
every batch.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor


def inside_mask(x: Tensor, box: Tensor, hdim: int, wdim: int) -> Tensor:
    """bool, broadcastable to ``x``: inside the box; ``box`` (4,) for the batch or (4, B) per sample."""
    H, W = x.shape[hdim], x.shape[wdim]
    ys = torch.arange(H, device=x.device)
    xs = torch.arange(W, device=x.device)
    if box.dim() == 1:
        return (((ys >= box[0]) & (ys < box[1])).view(_along(x, hdim, H))
                & ((xs >= box[2]) & (xs < box[3])).view(_along(x, wdim, W)))
    B = box.shape[1]
    rows = (ys >= box[0].view(B, 1)) & (ys < box[1].view(B, 1))  # (B, H)
    cols = (xs >= box[2].view(B, 1)) & (xs < box[3].view(B, 1))  # (B, W)
    return rows.view(_along2(x, hdim, H)) & cols.view(_along2(x, wdim, W))


def source_index(x: Tensor, perm: Tensor, box: Tensor, hdim: int, wdim: int) -> Tensor:
    """int64, broadcastable to ``x``: the sample each element is read from (``perm[i]`` in the box, else ``i``)."""
    B = x.shape[0]
    own = torch.arange(B, device=x.device).view(_along(x, 0, B))
    return torch.where(inside_mask(x, box, hdim, wdim), perm.view(_along(x, 0, B)), own)


_ARANGES: Dict[Tuple[int, torch.device, bool], Tensor] = {}


def _arange(n: int, device: torch.device) -> Tensor:
    """``torch.arange(n)`` on ``device``, made once per size and device (a fresh one in compiled graphs)."""
    if torch.compiler.is_compiling():
        return torch.arange(n, device=device)
    key = (n, device, torch.is_inference_mode_enabled())
    t = _ARANGES.get(key)
    if t is None:
        if len(_ARANGES) > 64:
            _ARANGES.clear()
        t = _ARANGES[key] = torch.arange(n, device=device)
    return t


def _along(x: Tensor, dim: int, size: int) -> List[int]:
    shape = [1] * x.dim()
    shape[dim] = size
    return shape


def _along2(x: Tensor, dim: int, size: int) -> List[int]:
    shape = _along(x, dim, size)
    shape[0] = x.shape[0]
    return shape


def batch_outer_order(x: Tensor) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Dimension orders (to, back) that make ``x``'s layout contiguous with the batch outermost, or
    ((), ()) when no reordering is needed or the batch is not outermost in memory (then the plain
    layout is used)."""
    order = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
    if order[0] != 0 or order == tuple(range(x.dim())):  # batch not outermost, or the plain layout already
        return (), ()
    return order, tuple(sorted(range(x.dim()), key=order.__getitem__))


def gather_batch(x: Tensor, src: Tensor, to: Tuple[int, ...] = (), back: Tuple[int, ...] = ()) -> Tensor:
    """``out[i, ...] = x[src[i, ...], ...]``, gathered in the order ``to`` (``x``'s memory layout)."""
    if not to:
        return torch.gather(x, 0, src.expand(x.shape))
    return torch.gather(x.permute(to), 0, src.expand(x.shape).permute(to)).permute(back)


class GatherPaste(torch.autograd.Function):
    """``gather_batch(x, src)`` with one box for the batch: its adjoint is the same gather with the inverse
    permutation (``inv_src``), since every element is read exactly once."""

    @staticmethod
    def forward(x: Tensor, src: Tensor, inv_src: Tensor, to: Tuple[int, ...], back: Tuple[int, ...]) -> Tensor:
        return gather_batch(x, src, to, back)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, _, inv_src, ctx.to, ctx.back = inputs
        ctx.save_for_backward(inv_src)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inv_src,) = ctx.saved_tensors
        return gather_batch(grad, inv_src, ctx.to, ctx.back), None, None, None, None


class PerSamplePaste(torch.autograd.Function):
    """``gather_batch(x, src)`` with one box per sample. A cell may then be read by two samples or by
    none, so the adjoint is not a gather: ``grad_x[j] = grad[j]`` outside box ``j`` plus
    ``grad[inv[j]]`` inside box ``inv[j]`` (the sample that read from ``j``). On CPU that is one
    scatter-add of the gradient by the forward's ``src`` (each cell gets at most two terms, so the
    order of the sum does not matter); elsewhere a masked select, one gather by ``inv`` and one add
    (deterministic where the scatter-add's atomics are not)."""

    @staticmethod
    def forward(x: Tensor, src: Tensor, inside: Tensor, inv_perm: Tensor, to: Tuple[int, ...],
                back: Tuple[int, ...]) -> Tensor:
        return gather_batch(x, src, to, back)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, src, inside, inv_perm, _, _ = inputs
        ctx.save_for_backward(src, inside, inv_perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        src, inside, inv_perm = ctx.saved_tensors
        if inside is None:
            return torch.zeros_like(grad).scatter_add_(0, src.expand(grad.shape), grad), None, None, None, None, None
        zero = grad.new_zeros(())
        taken = torch.where(inside, grad, zero).index_select(0, inv_perm)
        return torch.where(inside, zero, grad).add_(taken), None, None, None, None, None


def run(fn: "type[torch.autograd.Function]", *args: object) -> Tensor:
    """``fn.apply(*args)`` for a ``setup_context``-style Function, without its per-call cost in eager mode.

    ``Function.apply`` binds the call's arguments to ``forward``'s signature (``inspect``) on every call
    when ``setup_context`` is defined, which ``torch.func`` transforms need. Outside those transforms and
    outside compiled graphs the call goes to a twin with a ``ctx``-first ``forward`` running the same
    ``forward``, ``setup_context`` and ``backward``, which ``apply`` calls directly.

    Args:
        fn: a Function with static ``forward(*args)``, ``setup_context`` and ``backward``.
        *args: its arguments, positionally.

    Returns:
        What ``fn.apply(*args)`` returns (the same values and the same gradient).
    """
    if _transforms_active() or torch.compiler.is_compiling():
        return fn.apply(*args)
    twin = fn.__dict__.get("_eager_twin")
    if twin is None:
        twin = _eager_twin(fn)
        type.__setattr__(fn, "_eager_twin", twin)
    return twin.apply(*args)


def _eager_twin(fn: "type[torch.autograd.Function]") -> "type[torch.autograd.Function]":
    def forward(ctx, *args):
        output = fn.forward(*args)
        fn.setup_context(ctx, args, output)
        return output

    return type(f"{fn.__name__}Eager", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(fn.backward), "__module__": fn.__module__,
                 "__doc__": f"{fn.__name__} with a ctx-first forward (see ``run``)."})


# torch.func transforms (grad, vmap, ...) active: they need the setup_context style (a private query;
# without it every call takes that style)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def paste_masked(x: Tensor, perm: Tensor, inv_perm: Optional[Tensor], box: Tensor, hdim: int, wdim: int) -> Tensor:
    """``x`` with the tensor ``box`` ((4,) for the batch or (4, B) per sample) taken from ``x[perm]``;
    differentiable (``GatherPaste`` / ``PerSamplePaste``).

    Without autograd, on CPU, per-sample boxes on batches below ``BIT_SELECT_MAX`` elements (grids of at
    most ``BIT_SELECT_MAX_CELLS``) are pasted by ``select_bits`` (a few vectorized serial ops; the gather
    costs more there). ``inv_perm`` may be None:
    it is then computed where it is needed (a whole-batch box, or a per-sample backward off the CPU).
    """
    B = x.shape[0]
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if not needs_grad and _selects_bits(x, box, hdim, wdim):
        return select_bits(x, perm, box, hdim, wdim)
    if inv_perm is None and (box.dim() == 1 or (needs_grad and x.device.type != "cpu")):
        inv_perm = perm.argsort()
    own = _arange(B, x.device)
    if box.dim() == 2:  # per sample: the row's source, then one where over the grid (no (B, H, W) mask first)
        H, W = x.shape[hdim], x.shape[wdim]
        ys, xs = _arange(H, x.device), _arange(W, x.device)
        rows = ((ys >= box[0].view(B, 1)) & (ys < box[1].view(B, 1))).view(_along2(x, hdim, H))
        cols = ((xs >= box[2].view(B, 1)) & (xs < box[3].view(B, 1))).view(_along2(x, wdim, W))
        row_src = torch.where(rows, perm.view(_along(x, 0, B)), own.view(_along(x, 0, B)))
        src = torch.where(cols, row_src, own.view(_along(x, 0, B)))
        # the mask the non-CPU backward reads (the CPU one scatters by src)
        inside = rows & cols if x.requires_grad and x.device.type != "cpu" and torch.is_grad_enabled() else None
    else:
        inside = inside_mask(x, box, hdim, wdim)
        src = torch.where(inside, perm.view(_along(x, 0, B)), own.view(_along(x, 0, B)))
    to, back = batch_outer_order(x)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return gather_batch(x, src, to, back)
    if box.dim() == 1:
        return run(GatherPaste, x, src, source_index(x, inv_perm, box, hdim, wdim), to, back)
    return run(PerSamplePaste, x, src, inside, inv_perm, to, back)


# batches of fewer elements than this are pasted by select_bits without autograd on CPU: ATen's grain
# (at::internal::GRAIN_SIZE), below which each of its ops is one serial loop; larger batches take the
# gather, one parallel region that reads and writes memory fewer times
BIT_SELECT_MAX = 32768
# grids of at most this many cells (its edge table has 2 * (H + W + 2) rows of H * W cells)
BIT_SELECT_MAX_CELLS = 4096

# element size in bytes -> the integer dtype whose bits stand for an element in select_bits (signed: all
# ones is -1, so the max of masks is their and)
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# (h, w, h first, bits dtype, device, inference mode) -> (edge table, its row offsets, the offsets' upper bounds)
_EDGE_TABLES: Dict[tuple, Tuple[Tensor, Tensor, Tensor]] = {}


def _selects_bits(x: Tensor, box: Tensor, hdim: int, wdim: int) -> bool:
    """Whether ``paste_masked`` pastes by ``select_bits`` (no autograd, CPU, a small batch and grid)."""
    return (box.dim() == 2 and x.device.type == "cpu" and x.numel() < BIT_SELECT_MAX
            and x.shape[hdim] * x.shape[wdim] <= BIT_SELECT_MAX_CELLS and x.is_contiguous()
            and not x.is_complex() and x.element_size() in _BITS and not torch.compiler.is_compiling())


def _edge_table(h: int, w: int, h_first: bool, bits: torch.dtype, device: torch.device
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """The rows ``select_bits`` looks box edges up in, one cell of the grid per column (rows of height
    first when ``h_first``, else columns first): for ``k`` in [0, h], all-ones bits at the cells whose row
    is ``>= k``, then ``< k``; then the same for the column and ``k`` in [0, w]. With the (4, 1) offsets of
    the four blocks (y1, y2, x1, x2) and the offsets plus the side."""
    key = (h, w, h_first, bits, device, torch.is_inference_mode_enabled())
    cached = _EDGE_TABLES.get(key)
    if cached is None:
        if len(_EDGE_TABLES) > 64:
            _EDGE_TABLES.clear()
        ys = torch.arange(h, device=device).view(1, h, 1)
        xs = torch.arange(w, device=device).view(1, 1, w)
        ky = torch.arange(h + 1, device=device).view(-1, 1, 1)
        kx = torch.arange(w + 1, device=device).view(-1, 1, 1)
        blocks = [(ys >= ky).expand(-1, h, w), (ys < ky).expand(-1, h, w),
                  (xs >= kx).expand(-1, h, w), (xs < kx).expand(-1, h, w)]
        table = torch.cat(blocks if h_first else [b.transpose(1, 2) for b in blocks])
        table = table.reshape(len(table), h * w).to(bits).neg_()  # True -> all ones
        offsets = torch.tensor([0, h + 1, 2 * (h + 1), 2 * (h + 1) + w + 1], device=device).view(4, 1)
        sides = torch.tensor([h, h, w, w], device=device).view(4, 1)
        cached = _EDGE_TABLES[key] = (table, offsets, offsets + sides)
    return cached


def select_bits(x: Tensor, perm: Tensor, box: Tensor, hdim: int, wdim: int) -> Tensor:
    """``paste_masked`` with one box per sample, without autograd: the elements' bits selected by a mask.

    ``out = x ^ ((x[perm] ^ x) & inside)`` on the elements' bits (an integer view), where ``inside`` is all
    ones in the box and zero outside: every value comes through unchanged from ``x`` or ``x[perm]`` (NaN
    payloads and signed zeros included). ``inside`` is four rows of a cached table of edge masks over the
    grid (one ``index_select``) and-ed together (their max), broadcast over the other dims, so the ops are few,
    contiguous and vectorized whatever the batch.

    Args:
        x: a contiguous batch (batch on dim 0) whose element size is 1, 2, 4 or 8 bytes.
        perm: int64 (B,): sample ``i`` takes its box from sample ``perm[i]``.
        box: int (4, B) rows (y1, y2, x1, x2), half-open; edges outside the grid are clipped to it.
        hdim: the height dim.
        wdim: the width dim.

    Returns:
        A new tensor, contiguous, in ``x``'s dtype.
    """
    B, H, W = x.shape[0], x.shape[hdim], x.shape[wdim]
    bits = _BITS[x.element_size()]
    table, offsets, limits = _edge_table(H, W, hdim < wdim, bits, x.device)
    edges = table.index_select(0, (box + offsets).clamp_(offsets, limits).reshape(-1)).view(4, B, H * W)
    shape = [1] * x.dim()
    shape[0], shape[hdim], shape[wdim] = B, H, W
    inside = edges.amax(0).view(shape)  # all ones where all four are: the and of the four edges' masks
    own = x.view(bits)
    return x.index_select(0, perm).view(bits).bitwise_xor_(own).bitwise_and_(inside).bitwise_xor_(own).view(x.dtype)
