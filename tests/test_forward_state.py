"""One owner of a forward's state: every order of forwards and backwards, copies of the wrapper, inference
mode, a classifier reset, a module replaced after wrapping, fx and torch.func.

Each checkpointed run is compared with the same run without checkpointing (same seeds, same weights); timm
CNNs get random BatchNorm weights first (timm zero-initialises the last BN of each block).
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import featmix
from tests.conftest import TinyNet, gen
from tests.test_training_setups import randomize_bn, rel_diff

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 3])


def grads_of(model: nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class Blocks(nn.Module):
    """conv stem, three conv-BN-ReLU blocks (optionally checkpointed), linear head."""

    def __init__(self, reentrant=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                      for _ in range(3)])
        self.head = nn.Linear(8, 5)
        self.reentrant = reentrant
        randomize_bn(self)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x) if self.reentrant is None else checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x.mean((2, 3)))


def one_step_grads(model, make_wrapper, steps) -> dict:
    """Run ``steps(model, wrapper)`` and return the accumulated parameter gradients."""
    wrapper = make_wrapper(model)
    steps(model, wrapper)
    return grads_of(model)


# -- 3: a finished batch's draw is never replayed by an unrelated recomputation ---------------------------

def _after_wrapper_step(other):
    def steps(model, wrapper):
        F.cross_entropy(*wrapper(X, Y)).backward()
        model.zero_grad()
        other(model, wrapper)
    return steps


def _plain_inner_step(model, wrapper):
    F.cross_entropy(model(X), Y).backward()


def _second_wrapper_step(model, wrapper):
    second = featmix.CutMixAt(model, layer="blocks.1", variant="fixed_size", generator=gen(9)).train()
    F.cross_entropy(*second(X, Y)).backward()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("other", [_plain_inner_step, _second_wrapper_step], ids=["plain_inner", "second_wrapper"])
def test_a_later_unrelated_recomputation_does_not_replay_a_finished_draw(reentrant, other):
    def make(model):
        return featmix.CutMixAt(model, layer="blocks.1", variant="fixed_size", generator=gen(0)).train()
    want = one_step_grads(Blocks(), make, _after_wrapper_step(other))
    got = one_step_grads(Blocks(reentrant), make, _after_wrapper_step(other))
    assert rel_diff(got, want) < 1e-5


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_a_feature_cutmix_net_run_after_its_mixing_block_is_not_mixed_on_recomputation(reentrant):
    def run(mode):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), featmix.FeatureCutMix(), nn.Conv2d(4, 4, 3, padding=1),
                            nn.Flatten(), nn.Linear(4 * 16 * 16, 5)).train()
        body = net[1:3]

        def forward(x):
            h = net[0](x)
            h = body(h) if mode is None else checkpoint(body, h, use_reentrant=mode)
            return net[3:](h)
        with featmix.mixing(net, Y, num_classes=5, sampler=featmix.MixSampler(variant="fixed_size",
                                                                               generator=gen(0))) as batch:
            logits = forward(X)
        F.cross_entropy(logits, batch.targets).backward()
        net.zero_grad()
        F.cross_entropy(forward(X), Y).backward()  # outside the block: unarmed, also when recomputed
        return grads_of(net)
    assert rel_diff(run(reentrant), run(None)) < 1e-5


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_two_forwards_then_their_backwards_in_either_order_replay_each_forwards_own_mix(reentrant):
    def steps(model, wrapper):
        first = F.cross_entropy(*wrapper(X, Y))
        second = F.cross_entropy(*wrapper(X, Y))
        second.backward()
        first.backward()

    def make(model):
        return featmix.CutMixAt(model, layer="blocks.1", variant="fixed_size", generator=gen(0)).train()
    want = one_step_grads(Blocks(), make, steps)
    got = one_step_grads(Blocks(reentrant), make, steps)
    assert rel_diff(got, want) < 1e-5


# -- 7: several forwards before one backward ---------------------------------------------------------------

@pytest.mark.parametrize("kind,mode", [("cutmix", "batch"), ("mixup", "batch"), ("cutmix", "elem"),
                                       ("cutmix_or_mixup", "elem"), ("cutout", "batch")])
def test_summed_losses_of_two_forwards_train_as_two_backwards(kind, mode):
    def run(summed):
        model = Blocks()
        w = featmix.CutMixAt(model, layer="blocks.0", kind=kind, mode=mode, generator=gen(0)).train()
        losses = [F.cross_entropy(*w(X, Y)) for _ in range(2)]
        if summed:
            (losses[0] + losses[1]).backward()
        else:
            for loss in losses:
                loss.backward(retain_graph=True)
        return grads_of(model)
    assert rel_diff(run(True), run(False)) < 1e-6


@pytest.mark.parametrize("cls,kwargs", [(featmix.CutMix, {}), (featmix.Mixup, {}),
                                        (featmix.CutMix, {"mode": "elem"}), (featmix.CutMix, {"inplace": True})])
def test_input_transforms_on_images_that_require_grad_allow_two_calls_before_backward(cls, kwargs):
    t = cls(num_classes=5, generator=gen(0), **kwargs)
    leaf = X.clone().requires_grad_(True)
    outs = [t(leaf * 1.0, Y)[0] for _ in range(2)]
    (outs[0].sum() + 2 * outs[1].sum()).backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


# -- 6: copies are first-class ------------------------------------------------------------------------------

def _copies(w):
    buf = io.BytesIO()
    torch.save(w, buf)
    buf.seek(0)
    return {"deepcopy": copy.deepcopy(w), "pickle": pickle.loads(pickle.dumps(w)),
            "torch.save": torch.load(buf, weights_only=False)}


def test_copies_train_exactly_as_the_original_and_share_no_state():
    w = featmix.CutMixAt(Blocks(), layer="random", generator=gen(0)).train()
    F.cross_entropy(*w(X, Y)).backward()  # some history first
    copies = _copies(w)
    originals = []
    for _ in range(3):
        out, targets = w(X, Y)
        originals.append((out.detach(), targets, w.last_mix))
    for name, c in copies.items():
        c.model.zero_grad()
        for out0, targets0, rec0 in originals:
            out, targets = c(X, Y)
            assert torch.equal(out.detach(), out0) and torch.equal(targets, targets0), name
            assert (c.last_mix is None) == (rec0 is None) and (rec0 is None or c.last_mix.box == rec0.box), name
        F.cross_entropy(out, targets).backward()
        assert c.sampler.generator is not w.sampler.generator
        assert all(p.grad is not None for p in c.model.parameters()), name


def test_remove_on_a_copy_takes_its_hooks_off_its_model_only():
    w = featmix.CutMixAt(Blocks(), layer=["blocks.0", "blocks.2"], generator=gen(0))
    hooks = lambda m: sum(len(x._forward_hooks) for x in m.modules())  # noqa: E731
    for c in _copies(w).values():
        model = c.remove()
        assert hooks(model) == 0
        assert hooks(w.model) == 2
    assert hooks(w.remove()) == 0


def test_averaged_model_and_ema_copies_train_in_train_mode():
    from torch.optim.swa_utils import AveragedModel
    w = featmix.CutMixAt(Blocks(), layer="blocks.1", generator=gen(0)).train()
    averaged = AveragedModel(w)
    averaged.update_parameters(w)
    ema = timm.utils.ModelEmaV3(w, decay=0.9)
    w.eval()
    assert torch.equal(averaged.module.eval()(X), w(X)) and torch.equal(ema.module.eval()(X), w(X))
    w.train()
    reference = w(X, Y)
    for copy_ in (averaged.module, ema.module):
        copy_.train()
        out, targets = copy_(X, Y)
        assert torch.equal(targets, reference[1]) and torch.equal(out, reference[0])
        F.cross_entropy(out, targets).backward()


def _spawn_worker(rank, wrapper, queue):
    out, targets = wrapper(X, Y)
    F.cross_entropy(out, targets).backward()
    queue.put((targets.tolist(), wrapper.last_mix.box if wrapper.last_mix is not None else None))


@pytest.mark.slow
def test_a_wrapper_passed_to_spawn_workers_trains_there_as_here():
    import torch.multiprocessing as mp
    w = featmix.CutMixAt(Blocks(), layer="blocks.1", generator=gen(0)).train()
    before = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")  # this sandbox's shared memory cannot hold the pickled tensors
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.spawn(_spawn_worker, args=(w, queue), nprocs=1)
        targets, box = queue.get()
    finally:
        mp.set_sharing_strategy(before)
    here, here_targets = w(X, Y)
    assert here_targets.tolist() == targets and box == (w.last_mix.box if w.last_mix else None)


# -- 8: inference mode ---------------------------------------------------------------------------------------

def test_a_first_call_inside_inference_mode_does_not_poison_later_calls():
    w = featmix.CutMixAt(Blocks(), layer="blocks.1", generator=gen(0)).train()
    t = featmix.CutMix(num_classes=5, generator=gen(0))
    with torch.inference_mode():
        w(X, Y)
        t(X.clone(), Y)
    F.cross_entropy(*w(X, Y)).backward()
    t(X.clone(), Y)


# -- 9: a classifier reset ------------------------------------------------------------------------------------

def test_reset_classifier_on_the_wrapper_updates_the_targets_and_a_reset_inside_is_an_error():
    w = featmix.CutMixAt(timm.create_model("resnet10t", num_classes=5), layer=2, generator=gen(0)).train()
    w.reset_classifier(10)
    logits, targets = w(torch.randn(4, 3, 32, 32), torch.tensor([0, 9, 3, 7]))
    assert logits.shape == targets.shape == (4, 10)
    w.model.reset_classifier(3)
    with pytest.raises(RuntimeError, match=r"logits of shape \(4, 3\).*num_classes=10.*wrapper.reset_classifier"):
        w(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))


# -- 12: a module replaced after wrapping -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_050"])
def test_convert_sync_batchnorm_keeps_mixing_at_a_batchnorm_site(name):
    model = timm.create_model(name, num_classes=5)
    w = featmix.CutMixAt(model, layer=1, generator=gen(0)).train()
    w = nn.SyncBatchNorm.convert_sync_batchnorm(w)
    assert isinstance(w.model.get_submodule(w.sites[0].label and "bn1"), nn.SyncBatchNorm)
    seen = {}
    w.model.blocks.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0].detach()))
    x = torch.randn(4, 3, 32, 32)
    w.eval()
    plain = w.model.bn1(w.model.conv_stem(x))
    w.train()
    for m in w.model.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.eval()  # running statistics: the same map as above
    w.sampler.variant = "fixed_size"
    w(x, Y)
    rec = w.last_mix
    assert rec is not None and rec.grid == tuple(plain.shape[-2:])
    y1, y2, x1, x2 = rec.box
    assert torch.equal(seen["x"][:, :, y1:y2, x1:x2], plain[rec.perm][:, :, y1:y2, x1:x2])


# -- 14: fx and torch.func ----------------------------------------------------------------------------------

def test_fx_traces_the_wrapper_in_eval_and_feature_extraction_in_both_modes():
    from torchvision.models.feature_extraction import create_feature_extractor
    w = featmix.CutMixAt(TinyNet(num_classes=5), layer=2, generator=gen(0)).eval()
    traced = torch.fx.symbolic_trace(w)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(traced(x), w(x))
    extractor = create_feature_extractor(w, {"model.layer1": "feat"})
    assert extractor(x)["feat"].shape == (2, 8, 8, 8)


def test_torch_func_grad_over_functional_call_equals_autograd():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 5))
    w = featmix.CutMixAt(net, layer="1", variant="fixed_size", generator=gen(0)).train()
    params = dict(w.named_parameters())
    x = torch.randn(4, 3, 8, 8)

    def loss(p):
        out, targets = torch.func.functional_call(w, p, (x, Y))
        return F.cross_entropy(out, targets)
    w.sampler.generator.manual_seed(0)
    got = torch.func.grad(loss)(params)
    w.sampler.generator.manual_seed(0)
    w.zero_grad()
    loss(params).backward()
    assert set(got) == {n for n, p in params.items() if p.grad is not None}
    for name, p in params.items():
        torch.testing.assert_close(got[name], p.grad, msg=name)


# -- a train-mode forward without labels ---------------------------------------------------------------------

def test_a_train_forward_without_labels_recalibrates_batchnorm_and_cannot_be_trained_on():
    from torch.optim.swa_utils import update_bn
    model = Blocks()
    w = featmix.CutMixAt(model, layer="blocks.1", generator=gen(0))
    update_bn([X, X * 2], w)
    plain = Blocks()
    update_bn([X, X * 2], plain)
    assert torch.equal(model.blocks[1][1].running_mean, plain.blocks[1][1].running_mean)
    w.train()
    assert torch.equal(w(X), model(X))
    with pytest.raises(RuntimeError, match="called without labels"):
        F.cross_entropy(w(X), Y).backward()
    with torch.no_grad():
        w(X)  # a summary under no_grad


# -- 1, 5, 11: per-sample gradients, Cutout on one image, memory format -----------------------------------

def _where_reference(x, record):
    """``torch.where`` of each sample's own box, from the record (independent of featmix's kernels)."""
    B, _, H, W = x.shape
    ys, xs = torch.arange(H).view(1, H, 1), torch.arange(W).view(1, 1, W)
    box = record.box.view(B, 4, 1, 1)
    inside = ((ys >= box[:, 0]) & (ys < box[:, 1]) & (xs >= box[:, 2]) & (xs < box[:, 3])).unsqueeze(1)
    return torch.where(inside, x[record.perm], x)


@pytest.mark.parametrize("layer", ["layer1", "layer2"])
def test_per_sample_boxes_at_a_layer_give_the_where_reference_gradient(layer):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet18", num_classes=5))
    x = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    w = featmix.CutMixAt(model, layer=layer, mode="elem", generator=gen(0)).train()
    out, targets = w(x, labels)
    F.cross_entropy(out, targets).backward()
    got = grads_of(model)
    record = w.last_mix
    w.remove()
    model.zero_grad()
    stage = model.get_submodule(layer)
    handle = stage.register_forward_hook(lambda m, i, o: _where_reference(o, record))
    model.train()  # batch statistics: the same BN outputs as in the mixed run
    F.cross_entropy(model(x), targets).backward()
    handle.remove()
    assert rel_diff(got, grads_of(model)) < 1e-5


def test_cutout_cuts_a_batch_of_one_at_the_input_and_at_a_layer():
    images, _ = featmix.Cutout(size=0.5, generator=gen(0))(torch.ones(1, 3, 8, 8), None)
    assert (images == 0).sum() == 3 * 4 * 4
    w = featmix.CutMixAt(TinyNet(num_classes=5), layer=2, kind="cutout", generator=gen(0)).train()
    w(torch.randn(1, 3, 8, 8), torch.tensor([3]))
    assert w.last_mix is not None and w.last_mix.kind == "cutout"
    assert featmix.CutMix(num_classes=5, generator=gen(0))(torch.ones(1, 3, 8, 8), torch.tensor([1]))[0].eq(1).all()


@pytest.mark.parametrize("kind,mode", [("mixup", "batch"), ("mixup", "elem"), ("cutmix", "elem"),
                                       ("cutmix_or_mixup", "elem"), ("cutout", "elem"), ("cutmix", "pair")])
def test_channels_last_is_kept_by_every_kind_and_mode(kind, mode):
    x = torch.randn(6, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    t = featmix.CutMixOrMixup if kind == "cutmix_or_mixup" else {"mixup": featmix.Mixup, "cutmix": featmix.CutMix,
                                                                   "cutout": featmix.Cutout}[kind]
    out, _ = t(num_classes=5, generator=gen(0), mode=mode)(x.clone(memory_format=torch.channels_last),
                                                      torch.arange(6) % 5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    site = featmix.FeatureCutMix().train()
    sampler = featmix.MixSampler(kind=kind, mode=mode, generator=gen(0))
    with featmix.mixing([site], torch.arange(6) % 5, num_classes=5, sampler=sampler):
        mixed = site(x)
    assert mixed.is_contiguous(memory_format=torch.channels_last)


def test_sampler_state_dict_continues_the_draw_stream():
    w = featmix.CutMixAt(Blocks(), layer="blocks.1", generator=gen(0)).train()
    w(X, Y)
    state = copy.deepcopy(w.sampler.state_dict())
    later = [w(X, Y)[1] for _ in range(3)]
    resumed = featmix.CutMixAt(Blocks(), layer="blocks.1", generator=gen(123)).train()
    resumed.sampler.load_state_dict(state)
    assert all(torch.equal(resumed(X, Y)[1], t) for t in later)
    with pytest.raises(ValueError, match="pass generator=torch.Generator"):
        featmix.MixSampler().load_state_dict(state)


# -- what the wrapper reads from a model's output and layout ---------------------------------------------------

class PatchTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


class Tokens(nn.Module):
    """16 tokens of a 16 x 16 image (a grid the model does not declare), then a head; a dict output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = PatchTokens()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.embed(x)
        return {"loss": tokens.sum() * 0, "logits": self.head(tokens.mean(1))}


def test_a_resolved_token_layer_without_a_declared_grid_is_an_error_and_grid_fixes_it():
    w = featmix.CutMixAt(Tokens(), layer="embed", num_classes=5, generator=gen(0)).train()
    with pytest.raises(ValueError, match="does not declare this layer's token grid; pass grid="):
        w(X, Y)
    w = featmix.CutMixAt(Tokens(), layer="embed", num_classes=5, grid=(4, 4), generator=gen(0)).train()
    w(X, Y)
    assert w.last_mix.grid == (4, 4)
    w = featmix.CutMixAt(Tokens(), layer="embed", num_classes=5, grid=(2, 8), generator=gen(0)).train()
    with pytest.raises(ValueError, match="does not scale like the 16x16 input"):
        w(X, Y)


def test_the_logits_of_a_dict_output_are_its_logits_not_its_first_tensor():
    w = featmix.CutMixAt(Tokens(), layer=0, num_classes=5, generator=gen(0)).train()
    out, targets = w(X, Y)
    assert targets.shape == out["logits"].shape == (4, 5)


def test_cutmixat_from_timm_args_uses_timms_names_and_defaults():
    w = featmix.CutMixAt.from_timm_args(TinyNet(num_classes=5), layer=2, mixup_alpha=0.0, cutmix_alpha=1.0)
    assert w.sampler.kind == "cutmix" and w.label_smoothing == 0.1 and w.num_classes == 5
    both = featmix.CutMixAt.from_timm_args(TinyNet(num_classes=5), mixup_alpha=0.8, cutmix_alpha=1.0)
    assert both.sampler.kind == "cutmix_or_mixup" and both.sampler.mixup_alpha == 0.8


@pytest.mark.parametrize("plain_first", [True, False], ids=["plain_then_wrapper", "wrapper_then_plain"])
def test_one_backward_of_a_wrapper_forward_and_a_plain_forward_is_exact_or_an_error(plain_first):
    """Through reentrant checkpoints the two recomputations of the site may be told apart (autograd reaches
    the plain forward's segments before the wrapper's output binds its forward) or not: exact, or loud."""
    def steps(model, wrapper):
        losses = [F.cross_entropy(model(X), Y) if step == "plain" else F.cross_entropy(*wrapper(X, Y))
                  for step in (("plain", "wrapper") if plain_first else ("wrapper", "plain"))]
        (losses[0] + losses[1]).backward()

    def make(model):
        return featmix.CutMixAt(model, layer="blocks.1", variant="fixed_size", generator=gen(0)).train()
    want = one_step_grads(Blocks(), make, steps)
    try:
        got = one_step_grads(Blocks(True), make, steps)
    except RuntimeError as error:
        assert "several forwards of the same model" in str(error)
        return
    assert rel_diff(got, want) < 1e-5


def test_a_plain_forward_before_a_wrapper_forward_then_its_own_backward_is_not_mixed():
    def steps(model, wrapper):
        plain = F.cross_entropy(model(X), Y)
        mixed = F.cross_entropy(*wrapper(X, Y))
        plain.backward()
        mixed.backward()

    def make(model):
        return featmix.CutMixAt(model, layer="blocks.1", variant="fixed_size", generator=gen(0)).train()
    assert rel_diff(one_step_grads(Blocks(True), make, steps), one_step_grads(Blocks(), make, steps)) < 1e-5


def test_the_sites_are_not_module_calls_of_the_model_so_summaries_see_the_plain_model():
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        w = featmix.CutMixAt(Blocks(), layer=["blocks.0", "blocks.1"], generator=gen(0)).train()
        w(X, Y)
        w(X)  # a label-less train forward, as a summary makes
    finally:
        handle.remove()
    assert "FeatureCutMix" not in seen and seen.count("Blocks") == 2


def test_a_layer_whose_grid_never_holds_a_box_warns_once():
    w = featmix.CutMixAt(TinyNet(num_classes=5), layer=4, generator=gen(0)).train()  # 2 x 2 after layer3
    with pytest.warns(UserWarning, match="never pastes a box on a grid whose shorter side is 1 or 2"):
        w(torch.randn(4, 3, 8, 8), Y)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w(torch.randn(4, 3, 8, 8), Y)  # once


@pytest.mark.parametrize("reentrant", [None, True, False], ids=["plain", "reentrant", "non_reentrant"])
def test_a_forward_binds_its_backward_only_where_a_recomputation_can_run_its_site(reentrant):
    """Binding a forward to its backward (a pre-hook on its output) serves checkpoint replay alone: a site that
    pasted outside every checkpointed region is never run again by a backward, so nothing is bound there."""
    model = Blocks(reentrant)
    wrapper = featmix.CutMixAt(model, layer="blocks.1", generator=gen(3)).train()
    out, targets = wrapper(X, Y)
    assert wrapper.last_mix is not None
    assert wrapper._pass.last.watched == (reentrant is not None)
    F.cross_entropy(out, targets).backward()
    assert all(p.grad is not None for p in model.parameters())
