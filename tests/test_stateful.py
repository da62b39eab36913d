"""Stateful property test of CutMixAt in real training patterns (hypothesis ``RuleBasedStateMachine``).

Random sequences of: wrapper training forwards (the loss kept pending), forwards of the inner model
alone, forwards of a second wrapper on the same inner model, backwards of any pending loss in any order
(and of the sum of two), ``copy.deepcopy`` of a wrapper then training the copy, train/eval switches,
forwards that raise mid-forward, and a first call inside ``torch.inference_mode()``.

Every step runs in two worlds built from the same seeds and the same initial weights: one plain, one
whose inner blocks run under ``torch.utils.checkpoint.checkpoint`` (``use_reentrant=True`` in one test
class, ``False`` in the other). The DESIGN's rules checked:
- every mixed map equals the oracle (``tests/reference.py``) computed from its forward's record, and a
  forward that was not armed (the inner model alone, eval, the site of another wrapper) is not mixed;
- a recomputed forward replays exactly its own forward's mix: every parameter gradient of the
  checkpointed world equals the plain world's after every backward;
- a draw never outlives its forward (exceptions included): the next unarmed forward is unmixed;
- copies train as the original would (same output, record and targets for the same batch) and share
  no state with it;
- several forwards may precede one backward (no "modified by an inplace operation").
The one allowed error: the checkpointed world may raise featmix's ``RuntimeError`` for ONE backward of the
sum of two forwards' losses, at least one of them a training forward (their recomputations of a site
cannot always be told apart); then the plain world's gradients are copied over and the sequence goes on.
"""
from __future__ import annotations

import copy
import re
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import featmix
from tests.conftest import examples
from tests.reference import describe, expected_output, expected_targets, mismatch

NUM_CLASSES = 5
BATCH = 4
SIDE = 8
DTYPE = torch.float64
RTOL, ATOL = 1e-9, 1e-12  # float64: equal up to reassociation
BLOCKS = ("blocks.0", "blocks.1")


class Boom(Exception):
    """Raised on demand inside a forward."""


def in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class Block(nn.Module):
    """conv + BN + ReLU(inplace); keeps a copy of its output (before any hook) from each real forward."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        # no running statistics: a recomputed forward updates them a second time, which would make the
        # checkpointed world's eval outputs differ for a reason that is torch's, not featmix's
        self.bn = nn.BatchNorm2d(cout, track_running_stats=False)
        self.act = nn.ReLU(inplace=True)
        self.raise_now = False
        self.pre: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        if self.raise_now:
            raise Boom("raised on demand mid-forward")
        y = self.act(self.bn(self.conv(x)))
        if not in_backward():
            self.pre = y.detach().clone()
        return y


class Net(nn.Module):
    """stem conv, two blocks (8x8 then 4x4 maps), linear head; blocks optionally checkpointed."""

    def __init__(self, use_reentrant: Optional[bool]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList([Block(4, 4, 1), Block(4, 6, 2)])
        self.head = nn.Linear(6, NUM_CLASSES)
        self.use_reentrant = use_reentrant  # None: no checkpointing
        self.post: List[Optional[Tensor]] = [None, None]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            if self.use_reentrant is not None and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=self.use_reentrant)
            else:
                x = block(x)
            if not in_backward():
                self.post[i] = x.detach().clone()
        return self.head(x.mean((2, 3)))


def batch(seed: int) -> Tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, 3, SIDE, SIDE, generator=g, dtype=DTYPE),
            torch.randint(NUM_CLASSES, (BATCH,), generator=g))


class World:
    """One copy of the training state: inner models, wrappers on them, pending losses."""

    def __init__(self, name: str, use_reentrant: Optional[bool]) -> None:
        self.name = name
        torch.manual_seed(1234)
        net = Net(use_reentrant).to(DTYPE)
        a = featmix.CutMixAt(net, layer=list(BLOCKS), num_classes=NUM_CLASSES, label_smoothing=0.1,
                             generator=torch.Generator().manual_seed(1))
        b = featmix.CutMixAt(net, layer="blocks.1", num_classes=NUM_CLASSES, kind="cutmix_or_mixup", mode="elem",
                             generator=torch.Generator().manual_seed(2))
        self.nets: List[Net] = [net]
        self.wrappers: List[Tuple[featmix.CutMixAt, float]] = [(a, 0.1), (b, 0.0)]  # (wrapper, smoothing)
        self.pending: List[Tensor] = []

    def params(self) -> Dict[str, nn.Parameter]:
        return {f"net{i}.{n}": p for i, net in enumerate(self.nets) for n, p in net.named_parameters()}


def check_maps(world: World, net: Net, record, where: str) -> None:
    """Each block's output after the hooks: the oracle of its record at the chosen block, else unmixed."""
    for i, name in enumerate(BLOCKS):
        pre, post = net.blocks[i].pre, net.post[i]
        chosen = record is not None and record.layer == name
        want = expected_output(pre, record, "nchw") if chosen else pre
        what = f"[{world.name}] {where}: map after {name} ({'mixed by' if chosen else 'not chosen by'} the record)"
        problem = mismatch(post, want, what, RTOL, ATOL)
        close = problem is None
        assert close, f"{problem}\n  {describe(record)}"


def same(a: Tensor, b: Tensor, what: str) -> None:
    problem = mismatch(a, b, what, RTOL, ATOL)
    close = problem is None
    assert close, problem


class Machine(RuleBasedStateMachine):
    """Two worlds in lockstep: plain and checkpointed (``USE_REENTRANT``)."""

    USE_REENTRANT = True
    DISABLED: frozenset = frozenset()  # rule names to leave out (to isolate a failure by hand)

    def __init__(self) -> None:
        super().__init__()
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.worlds = (World("plain", None), World(f"checkpoint(use_reentrant={self.USE_REENTRANT})",
                                                   self.USE_REENTRANT))
        self.pending_info: List[Tuple[str, bool]] = []  # (description, from an armed training forward)
        self.forwards = 0

    def can(self, name: str) -> bool:
        return name not in self.DISABLED

    # -- the first call ----------------------------------------------------------------------------
    @initialize(how=st.sampled_from(["none", "wrapper train forward", "wrapper eval forward",
                                     "inner model forward"]), seed=st.integers(0, 2 ** 16))
    def first_call(self, how: str, seed: int) -> None:
        """Optionally, a first call inside torch.inference_mode() (it must not poison later calls)."""
        if how == "none" or not self.can("inference_mode"):
            return
        x, y = batch(seed)
        outs = []
        for world in self.worlds:
            wrapper, smoothing = world.wrappers[0]
            with torch.inference_mode():
                if how == "wrapper train forward":
                    out, targets = wrapper(x, y)
                    record = wrapper.last_mix
                    check_maps(world, wrapper.model, record, "wrapper forward in inference_mode")
                    same(targets, expected_targets(y, NUM_CLASSES, record, smoothing).to(targets.dtype),
                         f"[{world.name}] targets in inference_mode")
                elif how == "wrapper eval forward":
                    wrapper.eval()
                    out = wrapper(x)
                    wrapper.train()
                    check_maps(world, wrapper.model, None, "eval forward in inference_mode")
                else:
                    out = world.nets[0](x)
                    check_maps(world, world.nets[0], None, "inner forward in inference_mode")
            outs.append(out.clone())
        same(outs[1], outs[0], f"output of the {how} in inference_mode, checkpointed vs plain world")

    # -- forwards ----------------------------------------------------------------------------------
    def _wrapper_forward(self, index: int, seed: int, label: str) -> None:
        x, y = batch(seed)
        self.forwards += 1
        results = []
        for world in self.worlds:
            wrapper, smoothing = world.wrappers[index % len(world.wrappers)]
            if not wrapper.training:
                out = wrapper(x)
                check_maps(world, wrapper.model, None, f"{label} (eval)")
                with torch.no_grad():
                    plain = wrapper.model(x)
                same(out, plain, f"[{world.name}] eval output of the wrapper vs its model")
                results.append((out.detach(), None, None))
                continue
            out, targets = wrapper(x, y)
            record = wrapper.last_mix
            check_maps(world, wrapper.model, record, label)
            same(targets, expected_targets(y, NUM_CLASSES, record, smoothing).to(targets.dtype),
                 f"[{world.name}] {label}: targets vs oracle ({describe(record)})")
            world.pending.append(F.cross_entropy(out, targets))
            results.append((out.detach(), targets, describe(record)))
        (o0, t0, r0), (o1, t1, r1) = results
        same(o1, o0, f"{label}: output, checkpointed vs plain world")
        if t0 is not None:
            assert r0 == r1, f"{label}: records differ between worlds:\n  plain {r0}\n  checkpointed {r1}"
            self.pending_info.append((f"{label} #{self.forwards}", True))

    @precondition(lambda self: self.can("wrapper_forward"))
    @rule(index=st.integers(0, 7), seed=st.integers(0, 2 ** 16))
    def wrapper_forward(self, index: int, seed: int) -> None:
        """A forward of one of the wrappers (the first one, the second on the same model, or a copy)."""
        self._wrapper_forward(index, seed, f"forward of wrapper {index % len(self.worlds[0].wrappers)}")

    @precondition(lambda self: self.can("inner_forward"))
    @rule(index=st.integers(0, 7), seed=st.integers(0, 2 ** 16))
    def inner_forward(self, index: int, seed: int) -> None:
        """A forward of an inner model alone (never armed: never mixed); its loss kept pending."""
        x, _ = batch(seed)
        self.forwards += 1
        outs, kept = [], []
        for world in self.worlds:
            net = world.nets[index % len(world.nets)]
            out = net(x)
            check_maps(world, net, None, "forward of the inner model alone")
            kept.append(out.requires_grad)
            if out.requires_grad:
                world.pending.append(out.square().mean())
            outs.append(out.detach())
        same(outs[1], outs[0], "inner model output, checkpointed vs plain world")
        assert kept[0] == kept[1], "the inner model's output requires grad in one world only"
        if kept[0]:
            self.pending_info.append((f"inner model {index % len(self.worlds[0].nets)} forward #{self.forwards}",
                                      False))

    @precondition(lambda self: self.can("raising_forward"))
    @rule(index=st.integers(0, 7), seed=st.integers(0, 2 ** 16))
    def raising_forward(self, index: int, seed: int) -> None:
        """A wrapper forward that raises in blocks.1 (after blocks.0 may have mixed)."""
        x, y = batch(seed)
        for world in self.worlds:
            wrapper, _ = world.wrappers[index % len(world.wrappers)]
            block = wrapper.model.blocks[1]
            block.raise_now = True
            try:
                with pytest.raises(Boom):
                    wrapper(x, y) if wrapper.training else wrapper(x)
            finally:
                block.raise_now = False

    @precondition(lambda self: self.can("deepcopy"))
    @rule(index=st.integers(0, 7), seed=st.integers(0, 2 ** 16))
    def deepcopy_then_train(self, index: int, seed: int) -> None:
        """copy.deepcopy(wrapper), then train the copy: it must do what the original would (and share nothing)."""
        x, y = batch(seed)
        self.forwards += 1
        original_trained = self.worlds[0].wrappers[index % len(self.worlds[0].wrappers)][0].training
        for world in self.worlds:
            original, smoothing = world.wrappers[index % len(world.wrappers)]
            clone = copy.deepcopy(original)
            shared = [n for (n, p), q in zip(original.named_parameters(), clone.parameters())
                      if p.data_ptr() == q.data_ptr()]
            assert not shared, f"[{world.name}] the copy shares parameters with the original: {shared}"
            own_generator = clone.sampler.generator is not original.sampler.generator
            assert own_generator, f"[{world.name}] the copy shares its sampler's generator with the original"
            clone.train()
            out_c, targets_c = clone(x, y)
            rec_c = clone.last_mix
            check_maps(world, clone.model, rec_c, "forward of a deepcopy'd wrapper")
            same(targets_c, expected_targets(y, NUM_CLASSES, rec_c, smoothing).to(targets_c.dtype),
                 f"[{world.name}] targets of the copy vs oracle")
            world.wrappers.append((clone, smoothing))
            world.nets.append(clone.model)
            world.pending.append(F.cross_entropy(out_c, targets_c))
            if original.training:  # the original, same batch, same generator state: the same mix
                out_o, targets_o = original(x, y)
                rec_o = original.last_mix
                check_maps(world, original.model, rec_o, "forward of the original after copying it")
                assert describe(rec_o) == describe(rec_c), (f"[{world.name}] the copy mixed differently from its "
                                                           f"original:\n  copy {describe(rec_c)}\n  original "
                                                           f"{describe(rec_o)}")
                same(out_c, out_o, f"[{world.name}] output of the copy vs the original")
                world.pending.append(F.cross_entropy(out_o, targets_o))
        self.pending_info.append((f"forward of a copy of wrapper {index} #{self.forwards}", True))
        if original_trained:
            self.pending_info.append((f"forward of wrapper {index} after copying it #{self.forwards}", True))

    @precondition(lambda self: self.can("train_eval"))
    @rule(index=st.integers(0, 7), train=st.booleans(), whole=st.booleans())
    def train_eval(self, index: int, train: bool, whole: bool) -> None:
        """Switch a wrapper (with its model), or only the inner model, to train or eval mode."""
        for world in self.worlds:
            wrapper, _ = world.wrappers[index % len(world.wrappers)]
            (wrapper if whole else wrapper.model).train(train)

    # -- backwards ---------------------------------------------------------------------------------
    def _backward(self, picks: List[int]) -> None:
        infos = [self.pending_info[i] for i in picks]
        what = " + ".join(d for d, _ in infos)
        losses = [[w.pending[i] for i in picks] for w in self.worlds]
        for i in sorted(picks, reverse=True):
            del self.pending_info[i]
            for w in self.worlds:
                del w.pending[i]
        plain, ckpt = self.worlds
        try:
            sum(losses[0]).backward()
        except RuntimeError as e:
            raise AssertionError(f"backward of [{what}] raised in the plain world (no checkpointing): {e}") from e
        ambiguous = len(picks) == 2 and any(armed for _, armed in infos)
        try:
            sum(losses[1]).backward()
        except RuntimeError as e:
            if not (ambiguous and "several forwards of the same model" in str(e)):
                raise AssertionError(f"backward of [{what}] raised in the {ckpt.name} world (the plain world "
                                     f"did not): {e}") from e
            # allowed: recomputations of two forwards (one of them armed) summed into one backward; resync
            for (name, p), q in zip(plain.params().items(), ckpt.params().values()):
                q.grad = None if p.grad is None else p.grad.clone()
            return
        self._compare_grads(f"after the backward of [{what}]")

    def _compare_grads(self, when: str) -> None:
        plain, ckpt = self.worlds
        bad = []
        for (name, p), q in zip(plain.params().items(), ckpt.params().values()):
            if p.grad is None and q.grad is None:
                continue
            if p.grad is None or q.grad is None:
                bad.append(f"{name}: grad is {'None' if q.grad is None else 'set'} in the checkpointed world, "
                           f"{'None' if p.grad is None else 'set'} in the plain one")
                continue
            problem = mismatch(q.grad, p.grad, name, RTOL, ATOL)
            if problem:
                bad.append(problem)
        assert not bad, (f"{ckpt.name}: parameter gradients differ from the plain run {when}:\n  "
                         + "\n  ".join(bad))

    @precondition(lambda self: self.can("backward") and len(self.pending_info) >= 1)
    @rule(pick=st.integers(0, 63))
    def backward_one(self, pick: int) -> None:
        """loss.backward() of any pending loss (not necessarily the latest)."""
        self._backward([pick % len(self.pending_info)])

    @precondition(lambda self: self.can("backward_sum") and len(self.pending_info) >= 2)
    @rule(first=st.integers(0, 63), second=st.integers(0, 63))
    def backward_sum(self, first: int, second: int) -> None:
        """(loss_i + loss_j).backward() of two pending losses."""
        n = len(self.pending_info)
        i, j = first % n, second % n
        if i == j:
            j = (i + 1) % n
        self._backward([i, j])

    @precondition(lambda self: self.can("step"))
    @rule()
    def sgd_step(self) -> None:
        """p -= 0.1 * p.grad; grads cleared (both worlds). The step ends the iteration: losses still pending
        were computed with the old weights, which autograd saved and the step overwrites, so they are dropped
        (a backward of them raises in plain PyTorch)."""
        with torch.no_grad():
            for world in self.worlds:
                for p in world.params().values():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
                        p.grad = None
                world.pending.clear()
        self.pending_info.clear()

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def worlds_agree(self) -> None:
        plain, ckpt = self.worlds
        assert len(plain.pending) == len(ckpt.pending) == len(self.pending_info), \
            f"pending losses out of step: {len(plain.pending)}, {len(ckpt.pending)}, {len(self.pending_info)}"
        for (name, p), q in zip(plain.params().items(), ckpt.params().values()):
            same(q.detach(), p.detach(), f"parameter {name}, checkpointed vs plain world")

    def teardown(self) -> None:
        for world in self.worlds:
            world.pending.clear()
        torch.set_num_threads(self.threads)


def _case(use_reentrant: bool, n: int, steps: int):
    machine = type(f"Machine_reentrant_{use_reentrant}", (Machine,), {"USE_REENTRANT": use_reentrant})
    case = machine.TestCase
    case.settings = settings(max_examples=n, stateful_step_count=steps)
    return case


TestStatefulReentrant = _case(True, examples(15), 12)
TestStatefulNonReentrant = _case(False, examples(15), 12)
TestStatefulReentrantSlow = pytest.mark.slow(_case(True, max(150, examples(15)), 30))
TestStatefulNonReentrantSlow = pytest.mark.slow(_case(False, max(150, examples(15)), 30))


# -- named sequences: the machine's rules run in fixed orders, one contract each ----------------------------
# (the shortest sequences the machine found or that state one rule of the DESIGN; no shrinking needed, so a
# failure here names its contract directly)
A, B = 0, 1  # wrapper 0 mixes after blocks.0 or blocks.1 (one chosen per batch); wrapper 1 after blocks.1, per sample
SEQUENCES = {
    "one forward, one backward, twice": [("wrapper_forward", A, 1), ("backward_one", 0), ("wrapper_forward", A, 2),
                                         ("backward_one", 0)],
    "two forwards, then the first's backward": [("wrapper_forward", A, 1), ("wrapper_forward", A, 2),
                                                ("backward_one", 0)],
    "two forwards, backwards newest first": [("wrapper_forward", A, 1), ("wrapper_forward", A, 2),
                                             ("backward_one", 1), ("backward_one", 0)],
    "forwards of two wrappers on one model, then the first's backward": [
        ("wrapper_forward", A, 1), ("wrapper_forward", B, 2), ("backward_one", 0)],
    "a wrapper forward, then the inner model's forward and backward": [
        ("wrapper_forward", B, 1), ("inner_forward", 0, 2), ("backward_one", 1)],
    "a wrapper's forward and backward, then the inner model's": [
        ("wrapper_forward", B, 1), ("backward_one", 0), ("inner_forward", 0, 2), ("backward_one", 0)],
    "a forward, a forward that raises, then the first's backward": [
        ("wrapper_forward", A, 1), ("raising_forward", A, 2), ("backward_one", 0)],
    "a forward that raises, then the inner model alone": [
        ("raising_forward", A, 1), ("inner_forward", 0, 2), ("backward_one", 0)],
    "a first training call in inference_mode, then training": [
        ("first_call", "wrapper train forward", 0), ("wrapper_forward", A, 1), ("backward_one", 0)],
    "a first eval call in inference_mode, then training": [
        ("first_call", "wrapper eval forward", 0), ("wrapper_forward", A, 1), ("backward_one", 0)],
    "deepcopy a wrapper, train the copy": [("deepcopy_then_train", A, 1), ("backward_one", 0), ("backward_one", 0)],
    "two wrappers' forwards, one backward of their sum (RuntimeError allowed)": [
        ("wrapper_forward", A, 1), ("wrapper_forward", B, 2), ("backward_sum", 0, 1)],
}


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("name", list(SEQUENCES), ids=[re.sub(r"\W+", "_", n).strip("_") for n in SEQUENCES])
def test_sequence(name: str, use_reentrant: bool) -> None:
    """One named sequence of the machine's steps, plain vs checkpointed world, all checks of the machine."""
    machine = type("Sequence", (Machine,), {"USE_REENTRANT": use_reentrant})()
    steps = SEQUENCES[name]
    try:
        if steps[0][0] != "first_call":
            machine.first_call("none", 0)
        for op, *args in steps:
            getattr(machine, op)(*args)
            machine.worlds_agree()
    finally:
        machine.teardown()
