"""featmix against the independent oracle in ``tests/reference.py``, property-based (hypothesis).

Every entry point mixes a random small map and reports a ``MixRecord``; the oracle rebuilds from the
record alone what the output, the targets and the gradients must be. Entry points:
- ``transform``: the input transforms ``featmix.CutMix``/``Mixup``/``Cutout``/``CutMixOrMixup``
  (in place or not; NCHW or channels_last images);
- ``site``: a ``featmix.FeatureCutMix`` layer armed by ``featmix.mixing([site], ...)`` with a
  ``featmix.MixSampler`` (NCHW, channels_last, NHWC via ``hw_dims=(1, 2)``, tokens with 0-2 prefix
  tokens on ``grid=``);
- ``wrapper``: ``featmix.CutMixAt(module, layer="body")`` on a module whose output is the mixed map.

One test per property (values, targets and record, gradients, dtype/memory format, which batches mix) so
hypothesis reports one minimal example per broken property. Examples are drawn over kind x mode x
variant x grid (1..9 per side) x batch (0, 1, 2, 3, 5, 7) x dtype (float32, float64, bfloat16) x layout x
label smoothing x prob (0, 0.5, 1) x in place; combinations featmix rejects are checked to raise
``ValueError`` in ``test_invalid_combinations_raise``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import featmix
from tests.conftest import examples
from tests.reference import (
    BOX_KINDS,
    describe,
    expected_output,
    expected_targets,
    mismatch,
    record_violations,
    tolerance,
)

KINDS = ("cutmix", "mixup", "cutout", "cutmix_or_mixup")
MODES = ("batch", "elem", "pair")
VARIANTS = ("cutmix", "center_gaussian", "fixed_size", "one_hot", "complete_label")
# kind x variant pairs that make no sense: a box variant for Mixup (no box); a label or box-size variant for
# Cutout (labels kept, box size fixed by cutout_size). featmix must reject them with a ValueError.
INVALID = {("mixup", "center_gaussian"), ("mixup", "fixed_size"), ("cutout", "one_hot"),
           ("cutout", "complete_label"), ("cutout", "fixed_size")}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
LAYOUTS = {"transform": ("nchw", "channels_last"), "site": ("nchw", "channels_last", "nhwc", "tokens"),
           "wrapper": ("nchw", "channels_last")}
ENTRIES = ("transform", "site", "wrapper")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class Case:
    """One drawn example (printed by hypothesis as the falsifying example)."""

    entry: str
    kind: str
    mode: str
    variant: str
    batch: int
    h: int
    w: int
    channels: int
    dtype: str
    layout: str
    prefix: int
    smoothing: float
    prob: float
    inplace: bool
    soft_labels: bool
    num_classes: int
    requires_grad: bool
    seed: int


@st.composite
def cases(draw: Any, entry: str) -> Case:
    kind = draw(st.sampled_from(KINDS))
    if entry == "transform" and kind == "cutmix_or_mixup":
        variant = "cutmix"  # CutMixOrMixup takes no variant
    else:
        variant = draw(st.sampled_from([v for v in VARIANTS if (kind, v) not in INVALID]))
    layout = draw(st.sampled_from(LAYOUTS[entry]))
    return Case(
        entry=entry, kind=kind, mode=draw(st.sampled_from(MODES)), variant=variant,
        batch=draw(st.sampled_from((0, 1, 2, 3, 5, 7))),
        h=draw(st.integers(1, 9)), w=draw(st.integers(1, 9)), channels=draw(st.integers(1, 3)),
        dtype=draw(st.sampled_from(tuple(DTYPES))), layout=layout,
        prefix=draw(st.integers(0, 2)) if layout == "tokens" else 0,
        smoothing=draw(st.sampled_from((0.0, 0.1))), prob=draw(st.sampled_from((0.0, 0.5, 1.0))),
        inplace=draw(st.booleans()) if entry == "transform" else False,
        soft_labels=draw(st.booleans()), num_classes=draw(st.integers(2, 5)),
        requires_grad=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)),
    )


# -- running an entry point ----------------------------------------------------------------------------

class Passthrough(nn.Module):
    """Returns its input through ``body``: the map CutMixAt mixes after ``body`` is the model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@dataclass
class Run:
    case: Case
    x_before: Tensor          # the input's values before the call
    leaf: Tensor              # the leaf the gradients are taken for
    x_in: Tensor              # what was passed (a non-leaf clone for in-place transforms with grads)
    out: Tensor
    targets: Tensor
    record: Any
    labels: Tensor
    upstream: Tensor          # a random upstream gradient for ``out``

    @property
    def oracle_layout(self) -> str:
        return "nchw" if self.case.layout == "channels_last" else self.case.layout

    @property
    def grid(self):
        return self.case.h, self.case.w

    def expected(self, x: Optional[Tensor] = None) -> Tensor:
        x = self.x_before if x is None else x
        return expected_output(x, self.record, self.oracle_layout, self.case.prefix)

    def context(self) -> str:
        return f"\n  {self.case}\n  {describe(self.record)}"


def make_input(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    b, c, h, w = case.batch, case.channels, case.h, case.w
    shape = {"nchw": (b, c, h, w), "channels_last": (b, c, h, w), "nhwc": (b, h, w, c),
             "tokens": (b, case.prefix + h * w, c)}[case.layout]
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(DTYPES[case.dtype])
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if case.soft_labels:
        raw = torch.rand(b, case.num_classes, generator=g, dtype=torch.float64) + 0.1
        labels = (raw / raw.sum(1, keepdim=True)).to(torch.float32)
    else:
        labels = torch.randint(case.num_classes, (b,), generator=g)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64).to(DTYPES[case.dtype])
    return x, labels, upstream


def make_transform(case: Case, generator: torch.Generator) -> nn.Module:
    common = dict(num_classes=case.num_classes, prob=case.prob, label_smoothing=case.smoothing,
                  generator=generator, inplace=case.inplace, mode=case.mode)
    if case.kind == "cutmix":
        return featmix.CutMix(variant=case.variant, **common)
    if case.kind == "mixup":
        return featmix.Mixup(variant=case.variant, **common)
    if case.kind == "cutout":
        return featmix.Cutout(variant=case.variant, **common)
    return featmix.CutMixOrMixup(**common)


def make_sampler(case: Case, generator: torch.Generator) -> featmix.MixSampler:
    return featmix.MixSampler(prob=case.prob, variant=case.variant, kind=case.kind, mode=case.mode,
                              generator=generator)


def run(case: Case) -> Run:
    x, labels, upstream = make_input(case)
    generator = torch.Generator().manual_seed(case.seed + 1)
    leaf = x.clone().requires_grad_(case.requires_grad)
    x_in = leaf
    if case.entry == "transform":
        t = make_transform(case, generator)
        if case.inplace:  # in place needs a non-leaf (or a tensor that does not require grad)
            x_in = leaf.clone() if case.requires_grad else leaf
        out, targets = t(x_in, labels)
        record = t.last_mix
    elif case.entry == "site":
        hw_dims = (1, 2) if case.layout == "nhwc" else (-2, -1)
        site = featmix.FeatureCutMix(hw_dims=hw_dims, num_prefix_tokens=case.prefix,
                                     grid=(case.h, case.w) if case.layout == "tokens" else None)
        with featmix.mixing([site], labels, case.num_classes, sampler=make_sampler(case, generator),
                            label_smoothing=case.smoothing) as batch:
            out = site(x_in)
        targets, record = batch.targets, batch.record
    else:
        wrapper = featmix.CutMixAt(Passthrough(), layer="body", num_classes=case.num_classes, prob=case.prob,
                                   variant=case.variant, kind=case.kind, mode=case.mode,
                                   label_smoothing=case.smoothing, generator=generator)
        wrapper.train()
        out, targets = wrapper(x_in, labels)
        record = wrapper.last_mix
    return Run(case, x, leaf, x_in, out, targets, record, labels, upstream)


# -- the properties --------------------------------------------------------------------------------------


def check_output_matches_oracle(case: Case) -> None:
    """The mixed map is exactly what the record says: box kinds bit for bit, blends within rounding; an
    out-of-place call leaves its input alone, an in-place one returns the caller's tensor."""
    r = run(case)
    dtype = DTYPES[case.dtype]
    exact = r.record is None or r.record.kind in BOX_KINDS
    rtol, atol = (0.0, 0.0) if exact else tolerance(dtype)
    problem = mismatch(r.out, r.expected(), "mixed output vs oracle", rtol, atol)
    close = problem is None
    assert close, f"{problem}{r.context()}"
    if case.inplace:
        same = r.out.numel() == 0 or r.out.data_ptr() == r.x_in.data_ptr()
        assert same, "inplace=True returned a new tensor instead of the caller's" + r.context()
    else:
        untouched = torch.equal(r.leaf.detach(), r.x_before)
        assert untouched, "an out-of-place mix modified its input" + r.context()


def check_targets_and_record_follow_the_rules(case: Case) -> None:
    """Targets are the (smoothed) labels mixed with the record's label weight; the record itself obeys the
    paper's rules on the mixed map's grid (box inside, lam = 1 - area / grid, weight = corrected lam)."""
    r = run(case)
    want = expected_targets(r.labels, case.num_classes, r.record, case.smoothing)
    is_float = r.targets.is_floating_point()
    assert is_float, f"targets must be float, got {r.targets.dtype}" + r.context()
    rtol, atol = tolerance(r.targets.dtype)
    problem = mismatch(r.targets, want, "targets vs oracle", rtol, atol)
    close = problem is None
    assert close, f"{problem}{r.context()}"
    if r.record is not None:
        allowed = {"cutmix": {"cutmix"}, "mixup": {"mixup"}, "cutout": {"cutout"},
                   "cutmix_or_mixup": {"cutmix", "mixup"} if case.mode == "batch" else {"cutmix_or_mixup"}}
        kind_ok = r.record.kind in allowed[case.kind]
        assert kind_ok, \
            f"record.kind {r.record.kind!r} for kind={case.kind!r}, mode={case.mode!r}" + r.context()
        bad = record_violations(r.record, case.batch, r.grid, case.variant)
        assert not bad, "the record breaks the rules: " + "; ".join(bad) + r.context()


def check_gradients_match_oracle(case: Case) -> None:
    """autograd through featmix equals autograd through the oracle, for a random upstream gradient."""
    case = replace(case, requires_grad=True)
    r = run(case)
    has_graph = r.out.requires_grad
    assert has_graph, "the mixed output does not require grad: the graph to the input was lost" + r.context()
    (got,) = torch.autograd.grad(r.out, r.leaf, r.upstream, allow_unused=True)
    assert got is not None, "no gradient reached the input" + r.context()
    leaf = r.x_before.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(r.expected(leaf), leaf, r.upstream)
    rtol, atol = tolerance(DTYPES[case.dtype])
    problem = mismatch(got, want, "input gradient vs oracle", rtol, atol)
    close = problem is None
    assert close, f"{problem}{r.context()}"


def check_keeps_shape_dtype_and_memory_format(case: Case) -> None:
    """Same shape and dtype out as in; channels_last in -> channels_last out, contiguous in -> contiguous out."""
    r = run(case)
    same_shape = tuple(r.out.shape) == tuple(r.x_before.shape)
    assert same_shape, f"shape {tuple(r.out.shape)}" + r.context()
    same_dtype = r.out.dtype == r.x_before.dtype
    assert same_dtype, f"dtype {r.out.dtype} from {r.x_before.dtype}" + r.context()
    if case.layout == "channels_last":
        kept = r.out.is_contiguous(memory_format=torch.channels_last)
        assert kept, f"channels_last input, output strides {r.out.stride()} are not channels_last" + r.context()
    else:
        kept = r.out.is_contiguous()
        assert kept, f"contiguous input, output strides {r.out.stride()}" + r.context()


def check_which_batches_mix(case: Case) -> None:
    """prob=0 and empty batches never mix; a batch of one mixes only for Cutout (which needs no partner)
    and is otherwise the identity; prob=1 always mixes what can be mixed."""
    r = run(case)
    needs_partner = case.kind != "cutout"
    mixable = case.batch >= 2 or (case.batch == 1 and not needs_partner)
    if case.prob == 0.0 or not mixable:
        why = "prob=0" if case.prob == 0.0 else f"a batch of {case.batch} ({case.kind} needs a partner)"
        unmixed = r.record is None
        assert unmixed, f"{why} must not mix, got a record" + r.context()
        identity = torch.equal(r.out.detach(), r.x_before)
        assert identity, f"{why}: the output must be the input" + r.context()
    elif case.prob == 1.0:
        mixed = r.record is not None
        assert mixed, (f"prob=1 must mix a batch of {case.batch} "
                                      f"({'Cutout needs no partner' if not needs_partner else 'two or more'})"
                                      + r.context())


def example_case(**changes: Any) -> Case:
    """An explicit example (run before the generated ones, every run): small defaults, then ``changes``."""
    base = Case(entry="transform", kind="cutmix", mode="batch", variant="cutmix", batch=3, h=4, w=5, channels=2,
                dtype="float64", layout="nchw", prefix=0, smoothing=0.0, prob=1.0, inplace=False, soft_labels=False,
                num_classes=3, requires_grad=True, seed=0)
    return replace(base, **changes)


def _fits(case: Case, entry: str) -> Optional[Case]:
    """``case`` for ``entry``, or None where the entry has no such call (layout, in place, variant)."""
    case = replace(case, entry=entry)
    if case.layout not in LAYOUTS[entry] or (case.inplace and entry != "transform"):
        return None
    if entry == "transform" and case.kind == "cutmix_or_mixup" and case.variant != "cutmix":
        return None
    return case


PER_SAMPLE = [example_case(kind=k, mode=m) for k in KINDS for m in ("elem", "pair")]
# the edge cases every run covers, by property (hypothesis adds its generated examples after them)
EXPLICIT = {
    "output_matches_oracle": PER_SAMPLE + [
        example_case(kind="mixup", layout="tokens", prefix=2), example_case(kind="cutmix", layout="nhwc"),
        example_case(kind="cutmix", inplace=True, mode="elem"), example_case(kind="cutout", inplace=True),
        example_case(kind="cutmix_or_mixup", mode="elem", layout="tokens", prefix=1, dtype="bfloat16")],
    "targets_and_record_follow_the_rules": PER_SAMPLE + [
        example_case(kind="cutmix", soft_labels=True, smoothing=0.1, mode="elem"),
        example_case(kind="cutmix", variant="fixed_size", h=7, w=6),
        example_case(kind="cutmix", variant="one_hot", mode="pair")],
    "gradients_match_oracle": PER_SAMPLE + [
        example_case(kind="cutmix", inplace=True, mode=m) for m in MODES] + [
        example_case(kind="mixup", inplace=True), example_case(kind="cutmix", layout="tokens", prefix=2)],
    "keeps_shape_dtype_and_memory_format": [
        example_case(kind=k, mode=m, layout="channels_last", dtype="float32") for k in KINDS for m in MODES],
    "which_batches_mix": [example_case(kind="cutout", batch=1, mode=m) for m in MODES] + [
        example_case(kind=k, batch=b, mode=m) for k in KINDS for b in (0, 1) for m in ("batch", "elem")],
}


def prove(check, entry: str, n: int, explicit=()) -> None:
    """Run ``check`` on the explicit examples that fit ``entry``, then on ``n`` generated cases."""
    test = given(case=cases(entry))(check)
    for case in reversed(explicit):
        fitted = _fits(case, entry)
        if fitted is not None:
            test = example(case=fitted)(test)
    settings(max_examples=n)(test)()


# -- the tests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ENTRIES)
def test_output_matches_oracle(entry: str) -> None:
    prove(check_output_matches_oracle, entry, examples(25), EXPLICIT["output_matches_oracle"])


@pytest.mark.parametrize("entry", ENTRIES)
def test_targets_and_record_follow_the_rules(entry: str) -> None:
    prove(check_targets_and_record_follow_the_rules, entry, examples(25),
          EXPLICIT["targets_and_record_follow_the_rules"])


@pytest.mark.parametrize("entry", ENTRIES)
def test_gradients_match_oracle(entry: str) -> None:
    prove(check_gradients_match_oracle, entry, examples(25), EXPLICIT["gradients_match_oracle"])


@pytest.mark.parametrize("entry", ENTRIES)
def test_keeps_shape_dtype_and_memory_format(entry: str) -> None:
    prove(check_keeps_shape_dtype_and_memory_format, entry, examples(15),
          EXPLICIT["keeps_shape_dtype_and_memory_format"])


@pytest.mark.parametrize("entry", ENTRIES)
def test_which_batches_mix(entry: str) -> None:
    prove(check_which_batches_mix, entry, examples(15), EXPLICIT["which_batches_mix"])


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind, variant", sorted(INVALID))
def test_invalid_combinations_raise(entry: str, kind: str, variant: str) -> None:
    """A variant that does not fit the kind is a ValueError when the object is built."""
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="variant"):
        if entry == "transform":
            cls = {"mixup": featmix.Mixup, "cutout": featmix.Cutout}[kind]
            cls(num_classes=3, variant=variant, generator=gen)
        elif entry == "site":
            featmix.MixSampler(kind=kind, variant=variant, generator=gen)
        else:
            featmix.CutMixAt(Passthrough(), layer="body", num_classes=3, kind=kind, variant=variant, generator=gen)



# -- the same properties with ten times the examples, for ``pytest -m slow`` -----------------------------

@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES)
def test_output_matches_oracle_slow(entry: str) -> None:
    prove(check_output_matches_oracle, entry, max(10 * 25, examples(25)), EXPLICIT["output_matches_oracle"])


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES)
def test_targets_and_record_follow_the_rules_slow(entry: str) -> None:
    prove(check_targets_and_record_follow_the_rules, entry, max(10 * 25, examples(25)),
          EXPLICIT["targets_and_record_follow_the_rules"])


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES)
def test_gradients_match_oracle_slow(entry: str) -> None:
    prove(check_gradients_match_oracle, entry, max(10 * 25, examples(25)), EXPLICIT["gradients_match_oracle"])


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES)
def test_keeps_shape_dtype_and_memory_format_slow(entry: str) -> None:
    prove(check_keeps_shape_dtype_and_memory_format, entry, max(10 * 15, examples(15)),
          EXPLICIT["keeps_shape_dtype_and_memory_format"])


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES)
def test_which_batches_mix_slow(entry: str) -> None:
    prove(check_which_batches_mix, entry, max(10 * 15, examples(15)), EXPLICIT["which_batches_mix"])
