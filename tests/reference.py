"""An independent oracle for featmix's mixing: what a mixed map and its targets must be, given the record.

Nothing here imports featmix. The oracle reads only the public fields of a ``MixRecord`` (``grid``,
``box``, ``lam``, ``weight``, ``kind``, ``perm``, ``is_cut``) and rebuilds the expected output with plain
masks, ``torch.where`` and arithmetic, so it is differentiable: run autograd through it and compare with
featmix's gradients.

Layouts (where the grid lies in the tensor):
- ``"nchw"``: (B, C, h, w), the grid on dims (2, 3) (also for channels_last memory format, which is a
  memory layout of the same logical NCHW tensor);
- ``"nhwc"``: (B, h, w, C), the grid on dims (1, 2);
- ``"tokens"``: (B, P + h*w, C), ``P`` prefix tokens (class/register) left alone, the other tokens laid
  row-major on the h x w grid.

Semantics, per sample ``i`` with partner ``j = perm[i]``:
- ``cutmix``: inside sample i's box the partner's values, elsewhere its own: ``where(box_i, x[j], x[i])``;
- ``mixup``: ``lam_i * x[i] + (1 - lam_i) * x[j]`` on the whole grid (prefix tokens untouched);
- ``cutout``: ``where(box_i, 0, x[i])``;
- ``cutmix_or_mixup`` (per sample): the cutmix rule for samples with ``is_cut[i]``, the mixup rule with
  ``lam_i`` for the others.
Targets: one-hot (smoothed: ``(1 - eps) * y + eps / K``), then ``w_i * y[i] + (1 - w_i) * y[j]`` with
``w = record.weight``; Cutout keeps the (smoothed) labels.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

LAYOUTS = ("nchw", "nhwc", "tokens")
BOX_KINDS = ("cutmix", "cutout")


# -- reading a record --------------------------------------------------------------------------------

def boxes_of(record, batch: int) -> Tensor:
    """The record's box as an int64 (B, 4) tensor of (y1, y2, x1, x2) rows (a batch box repeated)."""
    box = record.box
    if box is None:
        raise ValueError(f"a {record.kind!r} record has no box")
    if isinstance(box, Tensor):
        b = box.detach().to("cpu", torch.int64)
        if b.dim() == 1:
            b = b.view(1, 4).expand(batch, 4)
        if tuple(b.shape) != (batch, 4):
            raise ValueError(f"record.box has shape {tuple(b.shape)}; expected (4,) or ({batch}, 4)")
        return b.clone()
    if len(box) != 4:
        raise ValueError(f"record.box must be (y1, y2, x1, x2), got {box!r}")
    return torch.tensor([int(v) for v in box], dtype=torch.int64).view(1, 4).expand(batch, 4).clone()


def per_sample(value: Union[float, Tensor], batch: int) -> Tensor:
    """A float or a 0-d/(B,) tensor as a float64 (B,) tensor on the CPU."""
    if isinstance(value, Tensor):
        v = value.detach().to("cpu", torch.float64)
        return v.expand(batch).clone() if v.dim() == 0 else v.reshape(batch).clone()
    return torch.full((batch,), float(value), dtype=torch.float64)


def perm_of(record, batch: int) -> Tensor:
    perm = record.perm
    if not isinstance(perm, Tensor):
        raise ValueError(f"record.perm must be a tensor, got {type(perm).__name__}")
    return perm.detach().to("cpu", torch.int64).reshape(batch)


# -- masks on a layout --------------------------------------------------------------------------------

def grid_of(x: Tensor, layout: str, prefix: int = 0) -> Tuple[int, int]:
    """(h, w) of the grid of ``x`` on ``layout`` (for tokens, only the token count is known: see ``grid=``)."""
    if layout == "nchw":
        return x.shape[-2], x.shape[-1]
    if layout == "nhwc":
        return x.shape[1], x.shape[2]
    raise ValueError("the token layout has no grid of its own: pass the grid")


def _box_cells(boxes: Tensor, h: int, w: int) -> Tensor:
    """bool (B, h, w): cell (r, c) of sample b is inside its box ``y1 <= r < y2, x1 <= c < x2``."""
    r = torch.arange(h).view(1, h, 1)
    c = torch.arange(w).view(1, 1, w)
    y1, y2, x1, x2 = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    return (r >= y1) & (r < y2) & (c >= x1) & (c < x2)


def _cells_to_layout(cells: Tensor, x: Tensor, layout: str, prefix: int) -> Tensor:
    """A per-sample (B, h, w) field laid out to broadcast against ``x`` (prefix tokens get ``False``/0)."""
    b, h, w = cells.shape
    if layout == "nchw":
        if x.dim() != 4 or tuple(x.shape[-2:]) != (h, w):
            raise ValueError(f"map of shape {tuple(x.shape)} does not have an NCHW {h}x{w} grid")
        return cells.view(b, 1, h, w)
    if layout == "nhwc":
        if x.dim() != 4 or tuple(x.shape[1:3]) != (h, w):
            raise ValueError(f"map of shape {tuple(x.shape)} does not have an NHWC {h}x{w} grid")
        return cells.view(b, h, w, 1)
    if layout == "tokens":
        if x.dim() != 3 or x.shape[1] != prefix + h * w:
            raise ValueError(f"tokens of shape {tuple(x.shape)} are not {prefix} prefix tokens + a {h}x{w} grid")
        flat = cells.reshape(b, h * w, 1)
        pad = torch.zeros(b, prefix, 1, dtype=flat.dtype)
        return torch.cat([pad, flat], dim=1)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def box_mask(x: Tensor, boxes: Tensor, grid: Tuple[int, int], layout: str, prefix: int = 0) -> Tensor:
    """bool mask broadcastable to ``x``: True inside each sample's box (never on prefix tokens)."""
    return _cells_to_layout(_box_cells(boxes, *grid), x, layout, prefix).to(x.device)


def grid_mask(x: Tensor, grid: Tuple[int, int], layout: str, prefix: int = 0) -> Tensor:
    """bool mask broadcastable to ``x``: True on every grid cell (False on prefix tokens)."""
    cells = torch.ones(x.shape[0], *grid, dtype=torch.bool)
    return _cells_to_layout(cells, x, layout, prefix).to(x.device)


def sample_field(values: Tensor, x: Tensor) -> Tensor:
    """A (B,) field viewed as (B, 1, ..., 1) to broadcast against ``x``."""
    return values.view([-1] + [1] * (x.dim() - 1)).to(x.device)


# -- the oracle ----------------------------------------------------------------------------------------

def expected_output(x: Tensor, record, layout: str = "nchw", prefix: int = 0,
                    compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """What a map ``x`` must become under ``record`` (``None``: not mixed, ``x`` unchanged).

    Computed in ``compute_dtype`` (float64) and returned in ``x``'s dtype; differentiable in ``x``.
    """
    if record is None:
        return x
    b = x.shape[0]
    grid = tuple(int(v) for v in record.grid)
    perm = perm_of(record, b).to(x.device)
    xs = x.to(compute_dtype)
    partner = xs.index_select(0, perm)
    on_grid = grid_mask(xs, grid, layout, prefix)
    kind = record.kind
    if kind == "mixup":
        lam = sample_field(per_sample(record.lam, b).to(compute_dtype), xs)
        out = torch.where(on_grid, lam * xs + (1 - lam) * partner, xs)
    elif kind == "cutmix":
        inside = box_mask(xs, boxes_of(record, b), grid, layout, prefix)
        out = torch.where(inside, partner, xs)
    elif kind == "cutout":
        inside = box_mask(xs, boxes_of(record, b), grid, layout, prefix)
        out = torch.where(inside, torch.zeros_like(xs), xs)
    elif kind == "cutmix_or_mixup":
        if record.is_cut is None:
            raise ValueError("a per-sample cutmix_or_mixup record must say which samples were cut (is_cut)")
        is_cut = sample_field(record.is_cut.detach().to("cpu", torch.bool).reshape(b), xs)
        lam = sample_field(per_sample(record.lam, b).to(compute_dtype), xs)
        inside = box_mask(xs, boxes_of(record, b), grid, layout, prefix)
        cut = torch.where(inside, partner, xs)
        blended = torch.where(on_grid, lam * xs + (1 - lam) * partner, xs)
        out = torch.where(is_cut, cut, blended)
    else:
        raise ValueError(f"unknown record kind {kind!r}")
    return out.to(x.dtype)


def one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """float64 (B, K): class indices or soft targets, smoothed ``(1 - eps) * y + eps / K``."""
    if labels.dim() == 1:
        y = (labels.view(-1, 1).cpu() == torch.arange(num_classes).view(1, -1)).to(torch.float64)
    else:
        y = labels.detach().cpu().to(torch.float64)
    return (1.0 - smoothing) * y + smoothing / num_classes


def expected_targets(labels: Tensor, num_classes: int, record, smoothing: float = 0.0) -> Tensor:
    """float64 (B, K) targets for a batch mixed as ``record`` says (None: the smoothed one-hot labels)."""
    y = one_hot(labels, num_classes, smoothing)
    if record is None or record.kind == "cutout":
        return y
    b = y.shape[0]
    w = per_sample(record.weight, b).view(b, 1)
    return w * y + (1.0 - w) * y.index_select(0, perm_of(record, b))


# -- the record's own rules -----------------------------------------------------------------------------

def record_violations(record, batch: int, grid: Tuple[int, int], variant: str = "cutmix",
                      correct_lam: bool = True) -> List[str]:
    """What is wrong with a record, as readable sentences (empty: nothing).

    Checked independently of how featmix places boxes: the record is on the map's grid; ``perm`` is a
    host int64 permutation of ``range(B)``; boxes are half-open and inside the grid; for box kinds the
    own-image weight ``lam`` is ``1 - box area / (h * w)`` (so a multiple of ``1/(h*w)``); the paper's label
    rule ``weight == lam`` (the label weight corrected to the pasted area) for the CutMix variants that
    keep it (``cutmix``, ``center_gaussian``, ``fixed_size``); ``fixed_size`` boxes are ``h//2 x w//2``
    wholly inside; ``one_hot`` weights are 0 or 1 and ``complete_label`` weights 0.5 for mixed samples;
    Cutout keeps the labels (weight 1); Mixup has no box.
    """
    bad: List[str] = []
    h, w = grid
    if tuple(int(v) for v in record.grid) != (h, w):
        bad.append(f"record.grid {tuple(record.grid)} is not the mixed map's grid {(h, w)}")
        return bad
    perm = record.perm
    if not isinstance(perm, Tensor) or perm.dtype != torch.int64 or perm.device.type != "cpu":
        bad.append(f"record.perm must be a host int64 tensor, got {perm!r}")
        return bad
    if tuple(perm.shape) != (batch,) or not torch.equal(perm.sort().values, torch.arange(batch)):
        bad.append(f"record.perm {perm.tolist()} is not a permutation of range({batch})")
        return bad
    lam = per_sample(record.lam, batch)
    weight = per_sample(record.weight, batch)
    if record.kind == "mixup":
        if record.box is not None:
            bad.append(f"a mixup record has a box {record.box!r}")
        return bad
    try:
        boxes = boxes_of(record, batch)
    except ValueError as e:
        return [str(e)]
    y1, y2, x1, x2 = boxes.unbind(1)
    if not bool(((0 <= y1) & (y1 <= y2) & (y2 <= h) & (0 <= x1) & (x1 <= x2) & (x2 <= w)).all()):
        bad.append(f"boxes {boxes.tolist()} are not half-open boxes inside the {h}x{w} grid")
        return bad
    area = ((y2 - y1) * (x2 - x1)).to(torch.float64)
    kept = 1.0 - area / float(h * w)
    cut = torch.ones(batch, dtype=torch.bool)
    if record.kind == "cutmix_or_mixup":
        cut = record.is_cut.detach().cpu().to(torch.bool).reshape(batch)
    if not torch.allclose(lam[cut], kept[cut], rtol=0, atol=1e-12):
        bad.append(f"lam {lam[cut].tolist()} != 1 - box area / grid area {kept[cut].tolist()} "
                   f"(boxes {boxes[cut].tolist()} on {h}x{w})")
    if record.kind == "cutout":
        if not torch.equal(weight, torch.ones(batch, dtype=torch.float64)):
            bad.append(f"Cutout must keep the labels (weight 1), got weight {weight.tolist()}")
        return bad
    if variant == "fixed_size":
        sides = torch.stack([y2 - y1, x2 - x1], 1)[cut]
        mixed = lam[cut] < 1
        if mixed.any() and not bool((sides[mixed] == torch.tensor([h // 2, w // 2])).all()):
            bad.append(f"fixed_size boxes must be {h // 2}x{w // 2} inside the grid, got {boxes[cut].tolist()}")
    if correct_lam and variant in ("cutmix", "center_gaussian", "fixed_size", "scheduled"):
        if not torch.allclose(weight[cut], kept[cut], rtol=0, atol=1e-12):
            bad.append(f"label weight {weight[cut].tolist()} != pasted-area lam {kept[cut].tolist()} "
                       f"(the paper's corrected lam)")
    elif variant == "one_hot":
        ok = (weight[cut] == 0) | (weight[cut] == 1)
        if not bool(ok.all()):
            bad.append(f"one_hot label weights must be 0 or 1, got {weight[cut].tolist()}")
    elif variant == "complete_label":
        mixed = cut & (lam < 1)
        if not bool((weight[mixed] == 0.5).all()):
            bad.append(f"complete_label weights of mixed samples must be 0.5, got {weight[mixed].tolist()}")
    return bad


# -- comparing -------------------------------------------------------------------------------------------

def tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """(rtol, atol) for a value computed in ``dtype`` against the float64 oracle."""
    return {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6), torch.float16: (1e-2, 1e-3),
            torch.bfloat16: (2e-2, 2e-2)}[dtype]


def mismatch(actual: Tensor, expected: Tensor, what: str, rtol: float, atol: float) -> Optional[str]:
    """None if close, else a readable sentence: where and by how much ``actual`` differs."""
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    close = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bool(close.all()):
        return None
    idx = (~close).nonzero()
    first = tuple(idx[0].tolist())
    return (f"{what}: {idx.shape[0]} of {a.numel()} elements differ (rtol={rtol}, atol={atol}); first at index "
            f"{first}: got {a[first].item()!r}, expected {e[first].item()!r}; max abs diff "
            f"{(a - e).abs().max().item():.3g}")


def describe(record) -> str:
    """A short one-line view of a record for failure messages."""
    if record is None:
        return "record=None (unmixed)"
    box = record.box
    if isinstance(box, Tensor):
        box = box.tolist()
    lam, weight = record.lam, record.weight
    lam = lam.tolist() if isinstance(lam, Tensor) else lam
    weight = weight.tolist() if isinstance(weight, Tensor) else weight
    cut = None if record.is_cut is None else record.is_cut.tolist()
    return (f"MixRecord(kind={record.kind!r}, layer={record.layer!r}, grid={tuple(record.grid)}, box={box}, "
            f"lam={lam}, weight={weight}, perm={None if record.perm is None else record.perm.tolist()}, "
            f"is_cut={cut})")


def all_close_grads(names: Sequence[str], got: Sequence[Optional[Tensor]], want: Sequence[Optional[Tensor]],
                    rtol: float, atol: float) -> List[str]:
    """Sentences for the gradients that differ (None on one side only counts as a difference)."""
    bad = []
    for name, a, e in zip(names, got, want):
        if a is None and e is None:
            continue
        if a is None or e is None:
            bad.append(f"{name}: gradient is {'None' if a is None else 'set'} here and "
                       f"{'None' if e is None else 'set'} in the reference run")
            continue
        m = mismatch(a, e, name, rtol, atol)
        if m:
            bad.append(m)
    return bad
