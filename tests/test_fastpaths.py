"""Every fast path of the mixing kernels against the simple reference, bit for bit.

The reference is the paper's code: clone, then ``out[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]``.
The kernels pick different strategies by device, box shape and size (full copy then box, each element
once, gather in place); each strategy is exercised here on CPU, including the
GPU one, and compared with ``torch.equal`` (all kernels only copy, so any difference is a bug).
Also: gradients against autograd through the reference, dtype and memory-format preservation, empty
and full boxes, the layer and transform entry points, and a smoke run of both benchmarks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch

import featmix
import featmix.functional as F
from featmix import MixDraw, MixSampler
from featmix.kernels import cpu, gpu, graph, regions
from tests.conftest import reference

Box = Tuple[int, int, int, int]
ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def reference_dims(x: torch.Tensor, perm: torch.Tensor, box: Box, hdim: int, wdim: int) -> torch.Tensor:
    """The same on any two dimensions."""
    y1, y2, x1, x2 = box
    idx = [slice(None)] * x.dim()
    idx[hdim], idx[wdim] = slice(y1, y2), slice(x1, x2)
    out = x.clone()
    out[tuple(idx)] = x[perm][tuple(idx)]
    return out


def make(shape, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def rand_perm(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


SMALL = (6, 3, 9, 11)
# one sample's box here is larger than ATen's grain (32768 elements): the copies run in parallel
LARGE = (5, 8, 70, 70)
BOXES = {
    "interior": (2, 7, 3, 8),
    "top_left_corner": (0, 4, 0, 5),
    "bottom_right_corner": (5, 9, 6, 11),
    "full_width": (2, 6, 0, 11),       # no side bands: CPU writes each element once
    "full_height": (0, 9, 4, 7),
    "single_pixel": (4, 5, 5, 6),
    "full": (0, 9, 0, 11),
}
LARGE_BOXES = {"interior": (3, 68, 2, 69), "full_width": (0, 66, 0, 70), "full": (0, 70, 0, 70)}


def cases():
    for name, box in BOXES.items():
        yield pytest.param(SMALL, box, id=f"small-{name}")
    for name, box in LARGE_BOXES.items():
        yield pytest.param(LARGE, box, id=f"large-{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,box", list(cases()))
def test_out_of_place_and_in_place_match_reference(shape, box, dtype):
    x = make(shape, dtype)
    perm = rand_perm(shape[0])
    want = reference(x, perm, box)
    before = x.clone()

    out = F.paste_box(x, perm, box)
    assert out.dtype == dtype and out.data_ptr() != x.data_ptr()
    assert torch.equal(out, want)
    assert torch.equal(x, before), "paste_box modified its input"

    masked = F.paste_box_masked(x, perm, torch.tensor(box))
    assert masked.dtype == dtype and torch.equal(masked, want)

    y = x.clone()
    ptr = y.data_ptr()
    res = F.paste_box_(y, perm, box)
    assert res is y and y.data_ptr() == ptr and y.dtype == dtype
    assert torch.equal(y, want)


@pytest.mark.parametrize("shape,box", list(cases()))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("writer", ["regions.write_once", "cpu.write_mixed", "cpu.write_mixed without inverse",
                                    "gpu.write_mixed"])
def test_every_out_of_place_strategy_matches_reference(shape, box, channels_last, writer):
    """Every strategy is tested on CPU whichever the dispatcher would pick here (the GPU one too); in
    channels_last a large box does not fold, so the CPU paste takes its scatter there."""
    x = make(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    perm = rand_perm(shape[0])
    inv = F.inverse_permutation(perm)
    out = torch.full_like(x, float("nan"))  # anything left unwritten would show
    module, name = writer.split(" ")[0].split(".")
    fn = getattr({"regions": regions, "cpu": cpu, "gpu": gpu}[module], name)
    if name == "write_mixed":
        fn(out, x, perm, None if writer.endswith("without inverse") else inv, box, 2, 3)
    else:
        fn(out, x, inv, box, 2, 3)
    assert torch.equal(out, reference(x, perm, box))


@pytest.mark.parametrize("shape,box", list(cases()))
@pytest.mark.parametrize("device_kernels", [cpu, gpu], ids=["cpu", "gpu"])
def test_every_in_place_strategy_matches_reference(shape, box, device_kernels):
    x = make(shape)
    perm = rand_perm(shape[0])
    want = reference(x, perm, box)
    device_kernels.paste_in_place(x, perm, box, 2, 3)
    assert torch.equal(x, want)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_graph_gather_keeps_the_layout_and_reads_from_the_source_sample(channels_last):
    x = make((5, 4, 7, 9))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    perm, box = rand_perm(5), (1, 5, 2, 8)
    src = graph.source_index(x, perm, torch.tensor(box), 2, 3)
    assert src.shape == (5, 1, 7, 9) and torch.equal(src[:, 0, 0, 0], torch.arange(5))
    assert torch.equal(src[:, 0, 2, 3], perm)
    out = graph.gather_batch(x, src, *graph.batch_outer_order(x))
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(out, reference(x, perm, box))


@pytest.mark.parametrize("perm_kind", ["random", "identity", "reversed", "one_cycle", "pairs"])
@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["small", "large"])
def test_in_place_every_permutation_shape(shape, perm_kind):
    """Fixed points, 2-cycles and one long cycle: every partner's box lands where it belongs."""
    B = shape[0]
    perm = {"random": rand_perm(B), "identity": torch.arange(B), "reversed": torch.arange(B).flip(0),
            "one_cycle": torch.roll(torch.arange(B), 1),
            "pairs": torch.tensor([i ^ 1 if (i ^ 1) < B else i for i in range(B)])}[perm_kind]
    box = (1, shape[2] - 1, 2, shape[3] - 1)
    x = make(shape)
    want = reference(x, perm, box)
    F.paste_box_(x, perm, box)
    assert torch.equal(x, want)


@pytest.mark.parametrize("inplace", [True, False], ids=["in_place", "out_of_place"])
def test_cpu_paste_is_a_few_ops_whatever_the_batch(inplace):
    """No op per sample (each would be a parallel region that waits for busy cores): the CPU paste of a
    large box dispatches the same few ops for a batch of 4 and of 64 (both above the small-batch path),
    forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for B in (4, 64):
        x = make((B, 8, 70, 70)).requires_grad_(not inplace)
        perm, box = rand_perm(B), LARGE_BOXES["interior"]
        want = reference(x.detach(), perm, box)
        Count.n = 0
        with Count():
            out = F.paste_box_(x, perm, box) if inplace else F.paste_box(x, perm, box)
            if not inplace:
                out.backward(torch.ones_like(out))
        counts.append(Count.n)
        assert torch.equal(out.detach(), want)
    # in place: the box view, the folded index (arange, unsqueeze, add, view), the gather, the copy back;
    # out of place: the same per paste, forward and backward, plus the sort of the inverse permutation
    assert counts[0] == counts[1] <= (7 if inplace else 21), counts


def where_reference(x: torch.Tensor, perm: torch.Tensor, box: Box, hdim: int, wdim: int) -> torch.Tensor:
    """``where(inside the box, x[perm], x)``: the paste's definition, independent of any slicing."""
    return torch.where(graph.inside_mask(x, torch.tensor(box), hdim, wdim), x[perm], x)


def typed(shape, dtype) -> torch.Tensor:
    """``make`` for any dtype (integers and bools from scaled normals)."""
    return make(shape, dtype) if dtype.is_floating_point else make(shape, torch.float64).mul(3).to(dtype)


# (name, tensor maker, box, hdim, wdim, whether the CPU kernels fold the batch into the gather's rows)
FOLD_CASES = {
    "nchw": (lambda dt: typed((5, 8, 70, 70), dt), (3, 68, 2, 69), 2, 3, True),
    "nchw_small_box": (lambda dt: typed((5, 8, 70, 70), dt), (3, 40, 2, 50), 2, 3, False),  # under GRAIN
    "channels_last": (lambda dt: typed((5, 8, 70, 70), dt).contiguous(memory_format=torch.channels_last),
                      (3, 68, 2, 69), 2, 3, False),
    "tokens_nhwc": (lambda dt: typed((5, 70, 70, 8), dt), (3, 68, 2, 69), 1, 2, False),
    "channel_slice": (lambda dt: typed((5, 12, 70, 70), dt)[:, 2:10], (3, 68, 2, 69), 2, 3, False),
    "strided_rows": (lambda dt: typed((5, 8, 140, 70), dt)[:, :, ::2], (3, 68, 2, 69), 2, 3, True),
    "one_channel": (lambda dt: typed((4, 1, 200, 200), dt), (0, 190, 5, 196), 2, 3, False),
    "expanded_batch": (lambda dt: typed((1, 8, 70, 70), dt).expand(5, 8, 70, 70), (3, 68, 2, 69), 2, 3, False),
    "expanded_all": (lambda dt: typed((1, 1, 1, 1), dt).expand(5, 8, 70, 70), (3, 68, 2, 69), 2, 3, True),
    "small": (lambda dt: typed((6, 3, 9, 11), dt), (2, 7, 3, 8), 2, 3, False),
}


@pytest.mark.parametrize("dtype", DTYPES + [torch.int64, torch.bool], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(FOLD_CASES))
def test_cpu_kernels_fold_where_they_can_and_match_the_where_reference(case, dtype):
    """The folded gather (the batch folded into the rows of one ``index_select``) and the unfolded ones
    (advanced indexing, ``index_copy_``), in and out of place, equal ``where(inside, x[perm], x)``."""
    maker, box, hdim, wdim, folds = FOLD_CASES[case]
    x = maker(dtype)
    perm = torch.tensor([3, 1, 4, 0, 2]) if x.shape[0] == 5 else rand_perm(x.shape[0])  # 1 is a fixed point
    want = where_reference(x, perm, box, hdim, wdim)
    out = torch.empty_like(x)
    assert (cpu._folds(x, box, hdim, wdim, out) is not None) == folds
    cpu.write_mixed(out, x, perm, F.inverse_permutation(perm), box, hdim, wdim)
    assert torch.equal(out, want)
    if not case.startswith("expanded"):  # an expanded tensor is never pasted in place
        assert (cpu._folds(x, box, hdim, wdim) is not None) == folds
        y = x.clone()
        y_strides = y.stride()
        cpu.paste_in_place(y, perm, box, hdim, wdim)
        assert y.stride() == y_strides and torch.equal(y, want)


@pytest.mark.parametrize("perm", [[0], [0, 1, 2], [2, 1, 0], [1, 2, 0]], ids=["batch1", "identity", "swap", "cycle"])
def test_folded_gather_batch_one_and_fixed_points(perm):
    perm = torch.tensor(perm)
    x = make((len(perm), 8, 70, 70))
    box = (3, 68, 2, 69)
    want = where_reference(x, perm, box, 2, 3)
    out = torch.empty_like(x)
    cpu.write_mixed(out, x, perm, F.inverse_permutation(perm), box, 2, 3)
    y = x.clone()
    cpu.paste_in_place(y, perm, box, 2, 3)
    assert torch.equal(out, want) and torch.equal(y, want)


def test_folded_paste_gradient_with_an_expanded_upstream_gradient():
    """``out.sum().backward()`` hands the paste's backward a gradient whose strides are all 0."""
    x = make((5, 8, 70, 70)).requires_grad_(True)
    perm, box = torch.tensor([3, 1, 4, 0, 2]), (3, 68, 2, 69)
    w = make((5, 8, 70, 70), seed=4)
    (ga,) = torch.autograd.grad((F.paste_box(x, perm, box) * w).sum(), x)
    (gb,) = torch.autograd.grad((where_reference(x, perm, box, 2, 3) * w).sum(), x)
    assert torch.equal(ga, gb)
    (ga,) = torch.autograd.grad(F.paste_box(x, perm, box).sum(), x)
    assert torch.equal(ga, torch.ones_like(ga))


def test_random_draws_all_kernels_agree():
    """Many random boxes (from the sampler's own rule) and permutations, all paths."""
    g = torch.Generator().manual_seed(123)
    for trial in range(40):
        B = int(torch.randint(2, 9, (1,), generator=g))
        H, W = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        x = make((B, 4, H, W), seed=trial)
        perm = torch.randperm(B, generator=g)
        u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        box = featmix.box_on_grid(u[0], (u[1], u[2]), H, W)
        want = reference(x, perm, box)
        assert torch.equal(F.paste_box(x, perm, box), want), (trial, box)
        assert torch.equal(F.paste_box_masked(x, perm, torch.tensor(box)), want), (trial, box)
        y = x.clone()
        assert torch.equal(F.paste_box_(y, perm, box), want), (trial, box)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("shape,box", list(cases()))
def test_paste_box_with_grad_matches_autograd_through_reference(shape, box, dtype):
    x = make(shape, dtype)
    perm = rand_perm(shape[0])
    g = make(shape, dtype, seed=7)

    a = x.clone().requires_grad_(True)
    out = F.paste_box(a, perm, box)
    assert out.requires_grad and out.grad_fn is not None
    assert torch.equal(out.detach(), reference(x, perm, box))
    (ga,) = torch.autograd.grad(out, a, g)

    b = x.clone().requires_grad_(True)
    (gb,) = torch.autograd.grad(reference(b, perm, box), b, g)
    assert ga.dtype == dtype
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("shape,box", list(cases()))
def test_paste_box_masked_grad_matches_autograd_through_reference(shape, box):
    """The compiled path's kernel: same forward bits and same gradient as the reference."""
    x = make(shape)
    perm = rand_perm(shape[0])
    g = make(shape, seed=9)
    a = x.clone().requires_grad_(True)
    out = F.paste_box_masked(a, perm, torch.tensor(box))
    assert torch.equal(out.detach(), reference(x, perm, box))
    (ga,) = torch.autograd.grad(out, a, g)
    b = x.clone().requires_grad_(True)
    (gb,) = torch.autograd.grad(reference(b, perm, box), b, g)
    assert torch.equal(ga, gb)


def test_paste_box_grad_on_other_dims_and_non_contiguous_input():
    """Token layout (B, H, W, C) on dims (1, 2), as a strided view that skips a prefix token."""
    tokens = make((4, 1 + 5 * 6, 7)).requires_grad_(True)
    spatial = tokens[:, 1:].unflatten(1, (5, 6))
    assert not spatial.is_contiguous()
    perm, box = rand_perm(4), (1, 4, 2, 6)
    out = F.paste_box(spatial, perm, box, 1, 2)
    assert torch.equal(out.detach(), reference_dims(spatial.detach(), perm, box, 1, 2))
    g = make(out.shape, seed=3)
    (ga,) = torch.autograd.grad(out, tokens, g)
    (gb,) = torch.autograd.grad(reference_dims(spatial, perm, box, 1, 2), tokens, g)
    assert torch.equal(ga, gb)
    assert torch.equal(ga[:, 0], torch.zeros_like(ga[:, 0]))  # the prefix token gets no gradient


@pytest.mark.parametrize("box", [(3, 3, 0, 11), (0, 9, 5, 5), (9, 9, 11, 11)], ids=["no_rows", "no_cols", "corner"])
def test_empty_box_is_identity(box):
    x = make(SMALL)
    perm = rand_perm(SMALL[0])
    before = x.clone()
    assert F.paste_box(x, perm, box) is x
    assert torch.equal(F.paste_box_masked(x, perm, torch.tensor(box)), before)
    assert F.paste_box_(x, perm, box) is x and torch.equal(x, before)


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["small", "large"])
def test_full_box_is_the_partner(shape):
    x = make(shape)
    perm = rand_perm(shape[0])
    box = (0, shape[2], 0, shape[3])
    assert torch.equal(F.paste_box(x, perm, box), x[perm])
    y = x.clone()
    assert torch.equal(F.paste_box_(y, perm, box), x[perm])


def test_channels_last_is_preserved_and_equal():
    x = make((6, 5, 9, 11)).contiguous(memory_format=torch.channels_last)
    perm, box = rand_perm(6), (2, 7, 3, 8)
    out = F.paste_box(x, perm, box)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, reference(x, perm, box))
    y = x.clone()
    F.paste_box_(y, perm, box)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, reference(x, perm, box))


def test_deterministic_mode_gives_the_same_result():
    """index_copy_ takes another code path under use_deterministic_algorithms: same bits."""
    x = make(LARGE)
    perm, box = rand_perm(LARGE[0]), (3, 60, 4, 50)
    want = reference(x, perm, box)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = F.paste_box(x, perm, box)
        y = x.clone()
        F.paste_box_(y, perm, box)
    finally:
        torch.use_deterministic_algorithms(old)
    assert torch.equal(out, want) and torch.equal(y, want)


# -- FeatureCutMix and CutMix entry points ------------------------------------------------------------

class PinnedSampler(MixSampler):
    """Hands out one given draw (the public way to fix what a site pastes)."""

    def __init__(self, pinned: MixDraw) -> None:
        super().__init__()
        self.pinned = pinned

    def draw(self, batch_size: int, num_sites: int = 1) -> MixDraw:
        return self.pinned


def mix_once(draw: MixDraw, x: torch.Tensor, **kwargs):
    """One ``FeatureCutMix`` forward of ``x`` under ``draw``: (output, record)."""
    site = featmix.FeatureCutMix(**kwargs).train()
    labels = torch.zeros(x.shape[0], dtype=torch.long)
    with featmix.mixing([site], labels, num_classes=1, sampler=PinnedSampler(draw)) as batch:
        out = site(x)
    return out, batch.record


def a_draw(B: int, lam: float = 0.45, center=(0.3, 0.6)) -> MixDraw:
    return MixDraw(mixed=True, lam=lam, center=center, perm=rand_perm(B), site=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_feature_cutmix_forward_4d(dtype, channels_last):
    x = make((8, 16, 14, 14), dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    draw = a_draw(8)
    out, record = mix_once(draw, x)
    box = draw.box_on_grid(14, 14)
    assert box[1] > box[0] and box[3] > box[2]
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(out, reference(x, draw.perm, box))
    assert record.grid == (14, 14) and record.box == box


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_feature_cutmix_forward_tokens_with_prefix(prefix):
    B, gh, gw, C = 6, 7, 7, 12
    x = make((B, prefix + gh * gw, C), torch.bfloat16)
    draw = a_draw(B)
    out, _ = mix_once(draw, x, num_prefix_tokens=prefix)
    box = draw.box_on_grid(gh, gw)
    want_spatial = reference_dims(x[:, prefix:].unflatten(1, (gh, gw)), draw.perm, box, 1, 2).flatten(1, 2)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    assert torch.equal(out[:, prefix:], want_spatial)
    assert not torch.equal(out, x)


def test_feature_cutmix_backward_matches_reference():
    x = make((6, 8, 10, 10))
    draw = a_draw(6)
    box = draw.box_on_grid(10, 10)
    g = make(x.shape, seed=5)
    a = x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(mix_once(draw, a)[0], a, g)
    b = x.clone().requires_grad_(True)
    (gb,) = torch.autograd.grad(reference(b, draw.perm, box), b, g)
    assert torch.equal(ga, gb)


def test_feature_cutmix_empty_box_is_identity():
    x = make((4, 3, 5, 5))
    out, _ = mix_once(a_draw(4, lam=1.0), x)  # lam = 1: zero-sized box
    assert torch.equal(out, x)


@pytest.mark.parametrize("shape", [(6, 3, 32, 32), (4, 8, 160, 160)], ids=["small", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cutmix_in_place_equals_out_of_place_and_reference(shape, dtype):
    images = make(shape, dtype)
    labels = torch.arange(shape[0]) % 10
    seed = 11
    oop = featmix.CutMix(10, generator=torch.Generator().manual_seed(seed))
    inp = featmix.CutMix(10, inplace=True, generator=torch.Generator().manual_seed(seed))
    perm = MixSampler(generator=torch.Generator().manual_seed(seed)).draw(shape[0]).perm

    before = images.clone()
    out, t_oop = oop(images, labels)
    assert torch.equal(images, before) and out.data_ptr() != images.data_ptr()
    box = oop.last_mix.box
    assert box[1] > box[0] and box[3] > box[2]
    box_elems = shape[1] * (box[1] - box[0]) * (box[3] - box[2])
    assert (box_elems >= 32768) == (shape[2] == 160)  # ATen's grain: the large box's copies run in parallel
    assert torch.equal(out, reference(before, perm, box))

    mixed, t_inp = inp(images, labels)
    assert mixed is images and mixed.dtype == dtype
    assert inp.last_mix.box == box
    assert torch.equal(mixed, out)
    assert torch.equal(t_inp, t_oop)


# -- the benchmarks run and write what they promise --------------------------------------------------

def run_module(module: str, out: Path, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_bench_mixing_quick_writes_json(tmp_path):
    data = run_module("experiments.bench.mixing", tmp_path / "mix.json", timeout=120)
    assert data["benchmark"] == "bench_mixing" and data["quick"] is True
    assert {"fixed", "environment", "results", "targets"} <= set(data)
    assert {(tuple(r["shape"]), r["dtype"]) for r in data["results"]} >= {((8, 3, 64, 64), "fp32"),
                                                                           ((8, 3, 64, 64), "bf16")}
    names = {c["contender"] for c in data["results"][0]["contenders"]}
    assert {"clone", "copy_", "featmix.CutMix(inplace)", "paste_box_", "paste_box", "FeatureCutMix",
            "paste_box fwd+bwd", "timm Mixup", "tv v2.CutMix", "ref inplace", "ref clone+paste"} <= names
    for c in data["results"][0]["contenders"]:
        assert 0 < c["min"] <= c["median"] <= c["max"] and c["n"] >= 5
        assert {"x_clone", "x_copy", "speedup_vs_timm", "speedup_vs_torchvision", "speedup_vs_ref"} <= set(c)
    assert len(data["targets"]) >= 3 and all("measured" in t and "met" in t for t in data["targets"])


def test_bench_host_quick_prints_every_row_and_writes_json(tmp_path):
    out = tmp_path / "host.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "experiments.bench.host", "--quick", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "bench_host" and data["quick"] is True and "environment" in data
    rows = data["rows"]
    names = " | ".join(r["row"] for r in rows)
    for part in ("vs timm Mixup", "vs its paste_box_", "CutMixAt(layer=2) fwd - plain fwd",
                 "vs CutMix(inplace) + plain fwd", "mode='elem'", "mode='pair'", "contention: CutMix(inplace)",
                 "contention: x.clone()", "the eager floor vs paste_box_", "timm vs the eager floor",
                 "the eager floor's fwd - plain fwd"):
        assert part in names, part
    assert sum("vs timm Mixup" in r["row"] for r in rows) == 2
    for r in rows:
        assert isinstance(r["value"], float) and r["us"]
        if r["op"] is None:
            assert r["met"] is None
        else:
            assert r["met"] == (r["value"] >= r["bound"] if r["op"] == ">=" else r["value"] <= r["bound"])
            verdict = "MET" if r["met"] else "MISSED"
            assert any(r["row"] in line and line.rstrip().endswith(verdict) for line in proc.stdout.splitlines())


def test_bench_step_quick_writes_json(tmp_path):
    data = run_module("experiments.bench.step", tmp_path / "step.json", timeout=150)
    assert data["benchmark"] == "bench_step" and data["quick"] is True
    variants = {v["variant"]: v for v in data["eager"]["variants"]}
    assert set(variants) == {"plain", "layer=2"}
    assert variants["plain"]["overhead_pct"] == 0.0
    assert all(v["median_ms"] > 0 and "paired_overhead_pct" in v for v in variants.values())
    iso = {c["variant"]: c for c in data["isolated_mixing"]}
    assert set(iso) == {"layer=2"} and iso["layer=2"]["median_ms"] > 0 and len(iso["layer=2"]["feature_shape"]) == 4
    graphs = data["compiled"]["graphs"]
    assert set(graphs) == {"plain", "layer=2"}
    assert all(g["graphs"] >= 1 for g in graphs.values())  # the counting backend saw the compiled graphs
    assert {"worst_overhead_pct", "worst_isolated_pct", "no_recompiles_after_settle"} <= set(data["target"])


def test_bench_compiled_quick_writes_json(tmp_path):
    data = run_module("experiments.bench.compiled", tmp_path / "compiled.json", timeout=300)
    assert data["benchmark"] == "bench_compiled" and data["quick"] is True
    assert {(r["model"], r["mode"]) for r in data["results"]} == {("test_resnet:8:32", "eager"),
                                                                   ("test_resnet:8:32", "default")}
    for r in data["verdicts"]:
        assert r["variant"] == "layer=2" and r["ratio"] > 0 and r["graphs_after_warmup"] >= 0
        assert (r["met"] is None) == (r["mode"] == "eager")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_per_sample_paste_gradient_is_the_adjoint(channels_last):
    """One box per sample (overlapping, empty, whole, fixed points in the permutation): forward and
    gradient equal autograd through ``where(inside, x[perm], x)``, bit for bit."""
    B, H, W = 7, 9, 11
    x = make((B, 4, H, W))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    perm = torch.tensor([3, 1, 0, 2, 6, 5, 4])  # 1 and 5 keep themselves
    box = torch.tensor([[1, 8, 2, 9], [0, 9, 0, 11], [4, 4, 0, 5], [2, 7, 3, 6], [0, 9, 0, 11], [5, 9, 6, 11],
                        [0, 3, 0, 3]]).t()
    grad_out = make((B, 4, H, W), seed=5)
    a = x.clone().requires_grad_(True)
    out = graph.paste_masked(a, perm, F.inverse_permutation(perm), box, 2, 3)
    out.backward(grad_out)
    b = x.clone().requires_grad_(True)
    inside = graph.inside_mask(b, box, 2, 3)
    want = torch.where(inside, b[perm], b)
    want.backward(grad_out)
    assert torch.equal(out.detach(), want.detach())
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8,
                                   torch.int64, torch.bool])
@pytest.mark.parametrize("shape,hdim,wdim", [((7, 3, 9, 11), 2, 3), ((5, 6, 4, 3), 1, 2), ((4, 2, 5, 6), 3, 2),
                                             ((3, 2, 4, 7, 5), 3, 4), ((0, 3, 4, 4), 2, 3)])
def test_per_sample_bit_select_copies_every_value_bit_for_bit(dtype, shape, hdim, wdim):
    """Without autograd a small per-sample paste selects bits (``graph.select_bits``): every element is its
    own or its partner's, bit for bit (NaN payloads and signed zeros included), on any dtype and layout; it
    reads a transposed box and clips edges outside the grid; its values are the gather's."""
    g = torch.Generator().manual_seed(7)
    B, H, W = shape[0], shape[hdim], shape[wdim]
    x = (torch.randn(shape, generator=g) * 50).to(dtype)
    bits = graph._BITS[x.element_size()]
    if dtype.is_floating_point and x.numel():
        x.view(-1)[:2] = torch.tensor([float("nan"), -0.0], dtype=dtype)
        x.view(bits).view(-1)[0] ^= 1  # another NaN payload
    perm = torch.randperm(B, generator=g)
    box = torch.randint(-2, max(H, W) + 3, (B, 4), generator=g).t()  # transposed: not contiguous
    assert graph._selects_bits(x, box, hdim, wdim)
    out = F.paste_box_masked(x, perm, box, hdim, wdim)
    inside = graph.inside_mask(x, box.contiguous(), hdim, wdim)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out.view(bits), torch.where(inside, x.view(bits)[perm], x.view(bits)))
    gathered = graph.gather_batch(x, graph.source_index(x, perm, box, hdim, wdim))
    if dtype.is_floating_point:
        out, gathered = out.nan_to_num(), gathered.nan_to_num()
    assert torch.equal(out, gathered)


def test_the_eager_floors_of_bench_host_do_the_same_work_as_featmix():
    """The floor rows of ``bench.host`` are meaningful only if the hand-written calls mix exactly as featmix
    does: the same images (or logits) and targets from the same seed, batch after batch."""
    import timm

    import models  # noqa: F401 - registers resnet8_cifar
    from experiments.bench import host

    k = 10
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, k, (16,), generator=g)
    ours, floor_x = x.clone(), x.clone()
    cutmix = featmix.CutMix(k, inplace=True, generator=torch.Generator().manual_seed(3))
    floor = host.eager_floor_input(floor_x, y, k, seed=3)
    for _ in range(20):
        _, targets = cutmix(ours, y)
        _, floor_targets = floor()
        assert torch.equal(ours, floor_x) and torch.equal(targets, floor_targets)

    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        model = timm.create_model("resnet8_cifar", num_classes=k).train()
        for m in model.modules():  # timm zero-initialises the last BN of each block: a wrong mix could hide there
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
        return model

    wrapped = featmix.CutMixAt(net(), layer=2, generator=torch.Generator().manual_seed(4)).train()
    floor_forward = host.eager_floor_feature(net(), 2, k, seed=4)
    for _ in range(10):
        (logits, targets), (floor_logits, floor_targets) = wrapped(x, y), floor_forward(x, y)
        assert torch.equal(logits, floor_logits) and torch.equal(targets, floor_targets)


@pytest.mark.parametrize("batch", [1, 2, 7, 16])
def test_the_per_sample_and_out_of_place_floors_of_bench_host_mix_as_featmix_does(batch):
    from experiments.bench import host

    k = 10
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, k, (batch,), generator=g)
    for mode, make_floor in (("elem", host.eager_floor_per_sample), ("batch", host.eager_floor_batch)):
        cutmix = featmix.CutMix(k, mode=mode, generator=torch.Generator().manual_seed(5))
        floor = make_floor(x, y, k, seed=5)
        for _ in range(20):
            (images, targets), (floor_images, floor_targets) = cutmix(x, y), floor()
            assert torch.equal(images, floor_images) and torch.equal(targets, floor_targets), mode
