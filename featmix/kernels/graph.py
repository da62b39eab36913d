"""The paste with the box as a tensor, for compiled graphs: one gather forward, one gather backward.

Every output element is read once, from the sample it comes from: ``src[i]`` is ``perm[i]`` inside
the box and ``i`` outside, so ``out = gather(x, 0, src)`` reads each element of ``x`` once (against
two reads for ``where(mask, x[perm], x)``), and the gradient is the same gather with the inverse
permutation (no scatter-add). Shapes are static and values live in tensors, so one graph serves
every batch.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

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


def paste_masked(x: Tensor, perm: Tensor, inv_perm: Tensor, box: Tensor, hdim: int, wdim: int) -> Tensor:
    """``x`` with the tensor ``box`` ((4,) for the batch or (4, B) per sample) taken from ``x[perm]``;
    differentiable (``GatherPaste`` / ``PerSamplePaste``)."""
    B = x.shape[0]
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
