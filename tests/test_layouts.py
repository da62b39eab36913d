"""Layouts read by ``featmix.resolve_layers``, checked against the real outputs of timm, torchvision and
Hugging Face models.

Each check runs a forward with a hook on the module the resolved site hooks and asks that the dims the
layout names as H, W (or the token grid after the prefix tokens) scale like the input image: each side is
the floor or ceil of the image side / s, one stride s for both axes. The images are not square, so a
layout that swaps H and W or takes the channels for W fails.
"""
from __future__ import annotations

import math
import pickle

import pytest
import timm
import torch
import torchvision
import transformers
from torch import nn

import featmix

# -- the black-box check ----------------------------------------------------------------------------


def _scales(image_hw, grid_hw) -> bool:
    """One integer stride s for both axes, each side the floor or ceil of image side / s."""
    (H, W), (h, w) = image_hw, grid_hw
    if h < 1 or w < 1:
        return False
    for s in range(1, max(H, W) + 1):
        if h in (H // s, -(-H // s)) and w in (W // s, -(-W // s)):
            return True
    return False


def _grid_of(spec, out: torch.Tensor, image_hw):
    """(h, w) the layout says the output has, after checking the output agrees with the layout."""
    if out.dim() == 4:
        dims = [d % 4 for d in spec.hw_dims]
        assert 0 not in dims and dims[0] != dims[1], f"{spec}: hw_dims {spec.hw_dims} name the batch dim"
        if spec.num_chs is not None:
            (channel_dim,) = {1, 2, 3} - set(dims)
            assert out.shape[channel_dim] == spec.num_chs, f"{spec}: channels {tuple(out.shape)}"
        return out.shape[dims[0]], out.shape[dims[1]]
    assert out.dim() == 3, f"{spec}: output of shape {tuple(out.shape)} is neither a map nor tokens"
    grid = spec.grid_fn(image_hw) if spec.grid_fn is not None else spec.grid
    assert grid is not None, f"{spec}: token output without a declared grid"
    tokens = out.shape[1] - spec.num_prefix_tokens
    assert grid[0] * grid[1] == tokens, f"{spec}: grid {grid} for {tokens} tokens after the prefix"
    return tuple(grid)


def check_layouts(model: nn.Module, image_hw, sites, batch: int = 2, **forward_kwargs):
    """Forward once with a hook on every site's module; each output's layout scales like the image."""
    outputs, handles = {}, []
    for spec in sites:
        module = model.get_submodule(spec.hook_name)
        handles.append(module.register_forward_hook(
            lambda m, i, o, key=spec.hook_name: outputs.setdefault(key, o)))
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(batch, 3, *image_hw), **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    grids = []
    for spec in sites:
        assert spec.hook_name in outputs, f"{spec}: the hooked module did not run"
        out = outputs[spec.hook_name]
        index = getattr(spec, "output_index", None)  # (a field main's SiteSpec lacks: the checker runs on both)
        if index is not None:
            assert isinstance(out, (tuple, list)), f"{spec}: output_index set but the module returns {type(out)}"
            out = out[index]
        assert isinstance(out, torch.Tensor), f"{spec}: output is a {type(out).__name__} (output_index missing?)"
        assert out.shape[0] == batch
        grid = _grid_of(spec, out, image_hw)
        assert _scales(image_hw, grid), f"{spec}: grid {grid} does not scale like the image {image_hw}"
        grids.append(grid)
    return grids


def index_sites(model: nn.Module):
    names = featmix.stage_names(model)
    assert names, f"{type(model).__name__}: no index sites"
    sites = [featmix.resolve_layers(model, i)[0] for i in range(1, len(names) + 1)]
    assert [s.module_name for s in sites] == names
    return sites


# -- a: torchvision Swin is NHWC ----------------------------------------------------------------------


def tv_swin(v2: bool = False) -> nn.Module:
    from torchvision.models import swin_transformer as sw
    extra = dict(block=sw.SwinTransformerBlockV2, downsample_layer=sw.PatchMergingV2) if v2 else {}
    torch.manual_seed(0)
    return sw.SwinTransformer(patch_size=[4, 4], embed_dim=12, depths=[1, 1, 1], num_heads=[1, 1, 1],
                              window_size=[2, 2], num_classes=8, **extra)


@pytest.fixture(scope="module")
def swin_t():
    torch.manual_seed(0)
    return torchvision.models.swin_t(num_classes=8)


def test_torchvision_swin_features_1_is_nhwc(swin_t):
    (spec,) = featmix.resolve_layers(swin_t, "features.1")
    assert spec.hw_dims == (1, 2)
    check_layouts(swin_t, (32, 64), [spec], batch=1)


def test_torchvision_swin_indices_are_stem_then_stages(swin_t):
    assert featmix.stage_names(swin_t) == ["features.0", "features.1", "features.3", "features.5", "features.7"]
    grids = check_layouts(swin_t, (32, 64), index_sites(swin_t), batch=1)
    assert grids == [(8, 16), (8, 16), (4, 8), (2, 4), (1, 2)]


def test_subclasses_of_library_models_keep_their_family():
    class MySwin(torchvision.models.SwinTransformer):
        pass

    class MyViT(transformers.ViTForImageClassification):
        pass

    swin = MySwin(patch_size=[4, 4], embed_dim=12, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2], num_classes=3)
    assert featmix.resolve_layers(swin, 2)[0].hw_dims == (1, 2)
    assert featmix.resolve_layers(MyViT(transformers.ViTConfig(**VIT_KW)), 2)[0].num_prefix_tokens == 1


def test_torchvision_swin_patch_conv_alone_is_nchw():
    (spec,) = featmix.resolve_layers(tv_swin(), "features.0.0")
    assert spec.hw_dims == (-2, -1)
    check_layouts(tv_swin(), (32, 48), [spec])


def test_cutmix_at_torchvision_swin_pastes_a_box_on_height_and_width():
    from conftest import find_rectangle

    model = tv_swin()
    seen = []
    model.features[2].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    wrapper = featmix.CutMixAt(model, layer="features.1", generator=torch.Generator().manual_seed(0))
    images, labels = torch.randn(4, 3, 32, 48), torch.tensor([0, 1, 2, 3])
    wrapper.train()
    for _ in range(10):  # until a batch is mixed with a box smaller than the map
        wrapper(images, labels)
        record = wrapper.last_mix
        if record is not None and 0 < record.lam < 1:
            break
    assert record is not None and tuple(record.grid) == (8, 12)  # the box is drawn on H x W = 8 x 12
    wrapper.eval()
    wrapper(images)
    mixed, plain = seen[-2], seen[-1]  # (B, H, W, C): NHWC
    changed = (mixed != plain).any(-1)  # per sample, which (h, w) cells changed, over all channels
    boxes = {find_rectangle(changed[b]) for b in range(4) if changed[b].any()}
    assert len(boxes) == 1 and None not in boxes  # one box, the same for the batch, on (H, W)
    whole = (mixed != plain)[changed]
    assert whole.all()  # every channel of a pasted cell changed: the box does not cut through C


# -- b: timm MLP-Mixer's patch embedding is `stem` -------------------------------------------------------


def test_timm_mixer_grid_comes_from_its_stem():
    model = timm.models.MlpMixer(num_classes=5, img_size=(32, 128), patch_size=8, num_blocks=2, embed_dim=16)
    (spec,) = featmix.resolve_layers(model, 2)
    assert (spec.module_name, spec.grid, spec.num_prefix_tokens) == ("blocks.0", (4, 16), 0)
    assert check_layouts(model, (32, 128), [spec]) == [(4, 16)]
    assert check_layouts(model, (32, 128), index_sites(model)) == [(4, 16)] * 3


# -- c: torchvision ViT: one class token on image_size // patch_size ------------------------------------


def test_torchvision_vit_b_16_encoder_layer_has_class_token_and_patch_grid():
    model = torchvision.models.vit_b_16(num_classes=8)
    (spec,) = featmix.resolve_layers(model, "encoder.layers.encoder_layer_3")
    assert (spec.num_prefix_tokens, spec.grid) == (1, (14, 14))
    assert featmix.stage_names(model) == ["conv_proj"] + [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    assert featmix.resolve_layers(model, 5)[0] == spec.__class__(**{**spec.__dict__, "label": 5})


def test_torchvision_vit_indices_match_outputs():
    model = torchvision.models.VisionTransformer(image_size=48, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5)
    sites = index_sites(model)
    assert [s.num_prefix_tokens for s in sites] == [0, 1, 1]
    assert check_layouts(model, (48, 48), sites) == [(6, 6)] * 3


# -- d: timm features_only wrappers --------------------------------------------------------------------


def test_timm_features_only_convnext_indices_and_names():
    model = timm.create_model("convnext_atto", features_only=True)
    assert featmix.stage_names(model) == ["stem_1", "stages_0", "stages_1", "stages_2", "stages_3"]
    (spec,) = featmix.resolve_layers(model, 2)
    assert (spec.module_name, spec.num_chs) == ("stages_0", 40)
    grids = check_layouts(model, (64, 96), index_sites(model))
    assert grids == [(16, 24), (16, 24), (8, 12), (4, 6), (2, 3)]


def test_timm_features_only_indices_agree_with_the_full_model():
    full = featmix.stage_names(timm.create_model("resnet18"))
    feats = timm.create_model("resnet18", features_only=True, out_indices=(1, 2))
    assert featmix.stage_names(feats) == full[:3]  # modules after the last requested feature are dropped
    check_layouts(feats, (64, 96), index_sites(feats))


# -- e: Hugging Face transformers ------------------------------------------------------------------------

T = transformers
VIT_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8, num_labels=5)


def hf_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "resnet":
        return T.ResNetForImageClassification(T.ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8,
                                                             num_labels=5))
    if kind == "convnext":
        return T.ConvNextForImageClassification(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                                 num_labels=5))
    if kind == "vit":
        return T.ViTForImageClassification(T.ViTConfig(**VIT_KW))
    if kind == "deit":
        return T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**VIT_KW))
    if kind == "swin":
        return T.SwinForImageClassification(T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1],
                                                         num_heads=[1, 1, 2], window_size=2, num_labels=5))
    if kind == "dinov2":
        return T.Dinov2ForImageClassification(T.Dinov2Config(**VIT_KW))
    if kind == "dinov2_registers":
        return T.Dinov2WithRegistersForImageClassification(T.Dinov2WithRegistersConfig(num_register_tokens=3,
                                                                                       **VIT_KW))
    if kind == "convnext_backbone":
        return T.ConvNextBackbone(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                   out_features=["stage1", "stage2"]))
    if kind == "swin_backbone":
        return T.SwinBackbone(T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                           window_size=2, out_features=["stage1", "stage2"]))
    if kind == "resnet_backbone":
        return T.ResNetBackbone(T.ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8,
                                               out_features=["stage1", "stage2"]))
    raise AssertionError(kind)


def test_hf_indices_are_stem_then_stages():
    assert featmix.stage_names(hf_model("resnet")) == ["resnet.embedder", "resnet.encoder.stages.0",
                                                       "resnet.encoder.stages.1"]
    assert featmix.stage_names(hf_model("convnext"))[0] == "convnext.embeddings"
    assert featmix.stage_names(hf_model("swin")) == ["swin.embeddings"] + [f"swin.encoder.layers.{i}"
                                                                            for i in range(3)]
    assert featmix.stage_names(hf_model("resnet_backbone")) == ["embedder", "encoder.stages.0", "encoder.stages.1"]


def test_hf_prefix_tokens_come_from_the_model():
    assert featmix.resolve_layers(hf_model("vit"), 2)[0].num_prefix_tokens == 1
    deit = featmix.resolve_layers(hf_model("deit"), [1, 2, 3])
    assert [s.num_prefix_tokens for s in deit] == [2, 2, 2]
    assert deit[0].grid == (4, 4)


def test_hf_register_tokens_count_as_prefix():
    assert [s.num_prefix_tokens for s in index_sites(hf_model("dinov2_registers"))] == [4, 4, 4]  # class + 3


def test_hf_vit_grid_follows_the_image_with_interpolated_positions():
    model = hf_model("vit")
    assert check_layouts(model, (48, 32), index_sites(model), interpolate_pos_encoding=True) == [(6, 4)] * 3


def test_hf_swin_layers_return_tuples_whose_first_element_is_tokens():
    sites = index_sites(hf_model("swin"))
    assert {s.output_index for s in sites} == {0}
    assert [s.grid for s in sites] == [(8, 8), (4, 4), (2, 2), (2, 2)]  # merging ends every stage but the last
    # padding: 36 x 44 -> 9 x 11 patches -> 5 x 6 -> 3 x 3 (each merge rounds odd sides up)
    assert check_layouts(hf_model("swin"), (36, 44), sites) == [(9, 11), (5, 6), (3, 3), (3, 3)]


def test_hf_grid_fn_pickles():
    from featmix.resolve import PatchGrid

    spec = featmix.resolve_layers(hf_model("swin"), 2)[0]
    assert isinstance(spec.grid_fn, PatchGrid)
    assert pickle.loads(pickle.dumps(spec.grid_fn)) == spec.grid_fn


def test_hf_undeclared_token_module_names_the_overrides():
    with pytest.raises(ValueError, match=r"layout=, grid=, num_prefix_tokens="):
        featmix.resolve_layers(hf_model("vit"), "vit.layers.0.mlp")


def test_hf_names_inside_layers_resolve_only_where_declared():
    (spec,) = featmix.resolve_layers(hf_model("resnet"), "resnet.encoder.stages.1.layers.0")  # a conv net: NCHW
    check_layouts(hf_model("resnet"), (32, 48), [spec])
    with pytest.raises(ValueError, match=r"not declared.*layout=, grid=, num_prefix_tokens="):
        featmix.resolve_layers(hf_model("convnext"), "convnext.encoder.stages.0.layers.0.layernorm")  # NHWC inside


def test_hf_undeclared_family_names_the_overrides():
    model = T.BeitForImageClassification(T.BeitConfig(**VIT_KW))
    with pytest.raises(ValueError, match=r"model_type='beit'.*layout=, grid=, num_prefix_tokens="):
        featmix.resolve_layers(model, 1)


def test_hf_num_classes_from_config():
    assert featmix.infer_num_classes(hf_model("deit")) == 5


# -- f: the black-box table ----------------------------------------------------------------------------

SIZE = (64, 96)


def _timm(name, **kw):
    return lambda: timm.create_model(name, num_classes=5, **kw)


# name -> (builder, image size); the image sizes are not square unless the model demands it.
TIMM = {
    "resnet18": (_timm("resnet18"), SIZE),
    "convnext_atto": (_timm("convnext_atto"), SIZE),
    "convnext_atto/features_only": (lambda: timm.create_model("convnext_atto", features_only=True), SIZE),
    "vit/features_only": (lambda: timm.create_model("vit_tiny_patch16_224", features_only=True, img_size=SIZE,
                                                    depth=3), SIZE),
    "mobilenetv3/features_only": (lambda: timm.create_model("mobilenetv3_small_050", features_only=True), SIZE),
    "swin/features_only": (lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", features_only=True, img_size=SIZE, window_size=4, embed_dim=16,
        depths=(1, 1, 1), num_heads=(1, 1, 1)), SIZE),
    "swin": (_timm("swin_tiny_patch4_window7_224", img_size=SIZE, window_size=4, embed_dim=16, depths=(1, 1, 1),
                   num_heads=(1, 1, 1)), SIZE),
    "vit/dynamic": (_timm("vit_tiny_patch16_224", dynamic_img_size=True, depth=2), (48, 80)),
    "vit/reg_tokens": (_timm("vit_tiny_patch16_224", img_size=SIZE, depth=2, reg_tokens=4), SIZE),
    "deit_distilled": (_timm("deit_tiny_distilled_patch16_224", img_size=SIZE, depth=2), SIZE),
    "eva02": (_timm("eva02_tiny_patch14_224", img_size=(56, 84), depth=2), (56, 84)),
    "mixer": (lambda: timm.models.MlpMixer(num_classes=5, img_size=(32, 128), patch_size=8, num_blocks=2,
                                           embed_dim=16), (32, 128)),
    "resmlp": (lambda: timm.models.MlpMixer(num_classes=5, img_size=64, patch_size=16, num_blocks=2, embed_dim=16,
                                            block_layer=timm.models.mlp_mixer.ResBlock, mlp_ratio=4), (64, 64)),
    "mambaout_femto": (_timm("mambaout_femto"), SIZE),
    "regnetx_002": (_timm("regnetx_002"), SIZE),
    "mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), SIZE),
    "efficientnet_b0": (_timm("efficientnet_b0"), SIZE),
    "ghostnet_050": (_timm("ghostnet_050"), SIZE),
    "densenet121": (_timm("densenet121"), SIZE),
    "poolformer_s12": (_timm("poolformer_s12"), SIZE),
    "cspresnet50": (_timm("cspresnet50"), SIZE),
}
TIMM_SLOW = {"densenet121", "poolformer_s12", "cspresnet50", "efficientnet_b0"}


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, 24, 1), CNBlockConfig(24, None, 1)], num_classes=5)


def _tv_regnet():
    from torchvision.models.regnet import BlockParams, RegNet
    return RegNet(BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8), num_classes=5)


TORCHVISION = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=5), SIZE),
    "swin": (lambda: tv_swin(), (32, 48)),
    "swin_v2": (lambda: tv_swin(v2=True), (32, 48)),
    "vit": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                         hidden_dim=16, mlp_dim=32, num_classes=5), (32, 32)),
    "convnext": (_tv_convnext, SIZE),
    "regnet": (_tv_regnet, SIZE),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=5), SIZE),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.25), SIZE),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=5), SIZE),
}
TORCHVISION_SLOW = {"efficientnet_b0"}

HF = {kind: (lambda kind=kind: hf_model(kind), (32, 32) if kind in ("vit", "deit") else (32, 48))
      for kind in ("resnet", "convnext", "vit", "deit", "swin", "dinov2", "dinov2_registers", "resnet_backbone",
                   "convnext_backbone", "swin_backbone")}


def _params(table, slow=()):
    return [pytest.param(k, marks=pytest.mark.slow) if k in slow else k for k in table]


@pytest.mark.parametrize("name", _params(TIMM, TIMM_SLOW))
def test_timm_layouts_match_outputs(name, one_thread):
    build, size = TIMM[name]
    torch.manual_seed(0)
    model = build()
    check_layouts(model, size, index_sites(model))


@pytest.mark.parametrize("name", _params(TORCHVISION, TORCHVISION_SLOW))
def test_torchvision_layouts_match_outputs(name, one_thread):
    build, size = TORCHVISION[name]
    torch.manual_seed(0)
    model = build()
    check_layouts(model, size, index_sites(model))


@pytest.mark.parametrize("name", list(HF))
def test_hf_layouts_match_outputs(name, one_thread):
    build, size = HF[name]
    model = build()
    check_layouts(model, size, index_sites(model))


def test_random_draws_from_the_declared_sites():
    model = hf_model("deit")
    sites = featmix.resolve_layers(model, "random")
    assert [s.label for s in sites] == [0, 1, 2]
    assert math.prod(sites[1].grid) == 16
