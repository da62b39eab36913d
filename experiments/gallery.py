"""Pictures of featmix at work: `python -m experiments.gallery [--out docs/img] [--seed 0]`.

One batch of Fashion-MNIST test images (Debian's files, found as the studies find them; synthetic striped
images when they are absent) goes through the repository's CIFAR ResNet-8 (untrained: the pictures show
where the mix lands, not what a network learns). Everything comes from `--seed`, so the same command draws
the same pictures. Written to `--out`:

- `layers.png`: the same batch and the same draw mixed at layer index 0 (the input) to 4 (after the last
  stage) with `featmix.CutMixAt`: per layer, the box `last_mix.box` = (y1, y2, x1, x2) on the layer's own grid
  `last_mix.grid`, drawn with that grid's cells and scaled onto the image, then feature channels of one
  sample before and after the paste (the partner's features inside the box);
- `kinds.png`: the batch through `featmix.CutMix`, `featmix.Mixup`, `featmix.Cutout` and `featmix.CutMix` with
  `mode="elem"` (each sample its own box), side by side;
- `cutmix.png`: one row of CutMix-ed images with their targets, for the front page.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import timm
import torch

import featmix
import models  # noqa: F401  (registers the CIFAR models with timm)

from .data import balanced_subset, find_fashion_mnist, load_fashion_mnist, make_synthetic
from .results import pyplot

CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
LAYER_NAMES = {0: "input", 1: "after the stem", 2: "after layer1", 3: "after layer2", 4: "after layer3"}


def load_batch(n: int, seed: int, data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`n` class-balanced test images in [0, 1] (n, 1, 28, 28), their labels and where they come from."""
    g = torch.Generator().manual_seed(seed)
    if find_fashion_mnist(data_dir) is not None:
        data, source = load_fashion_mnist(data_dir), "Fashion-MNIST test images"
    else:
        data, source = make_synthetic(n_train=4, n_test=10 * n, size=28, num_classes=10, seed=seed), "synthetic images"
    pick = balanced_subset(data.test_y, n, g)
    pick = pick[torch.randperm(len(pick), generator=g)]
    return data.test_x[pick].float().div(255), data.test_y[pick], source


def make_model(seed: int) -> torch.nn.Module:
    """The CIFAR ResNet-8 of the studies (untrained, seeded), for one-channel 28x28 images."""
    torch.manual_seed(seed)
    return timm.create_model("resnet8_cifar", num_classes=10, in_chans=1).train()


def mix_at_layer(images: torch.Tensor, labels: torch.Tensor, layer: int, seed: int) -> dict[str, Any]:
    """Mix `images` at `layer` with `featmix.CutMixAt`; the map there before and after the paste and the record."""
    model = make_model(seed)
    x = (images - 0.5) / 0.5
    seen: dict[str, torch.Tensor] = {}
    if layer == 0:  # the map at the input is the image; the mixed one is what the network receives
        before = x
        wrapper = featmix.CutMixAt(model, layer=0, generator=torch.Generator().manual_seed(seed))
        hook = model.register_forward_pre_hook(lambda m, args: seen.__setitem__("after", args[0].detach().clone()))
    else:
        site = model.get_submodule(featmix.resolve_layers(model, layer)[0].module_name)
        hook = site.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out.detach().clone()))
        with torch.no_grad():
            model(x)  # unmixed: the layers before `layer` compute what the mixed forward computes
        before = seen.pop("out")
        hook.remove()
        wrapper = featmix.CutMixAt(model, layer=layer, generator=torch.Generator().manual_seed(seed))
        # registered after the wrapper's own hook, so it sees the pasted map
        hook = site.register_forward_hook(lambda m, args, out: seen.__setitem__("after", out.detach().clone()))
    with torch.no_grad():
        _, targets = wrapper(x, labels)
    hook.remove()
    record = wrapper.last_mix
    after = seen.get("after", seen.get("out"))
    if record is None or after is None:
        raise RuntimeError(f"layer {layer}: the batch was not mixed (prob=1 mixes every batch)")
    check_paste_inside_box(before, after, record.box, layer)
    return {"layer": layer, "before": before, "after": after, "grid": tuple(record.grid),
            "box": tuple(int(v) for v in record.box), "lam": float(record.lam), "targets": targets}


def check_paste_inside_box(before: torch.Tensor, after: torch.Tensor, box: Sequence[int], layer: int) -> None:
    """The paste changed nothing outside the recorded box (else the pictures would show the wrong maps)."""
    y1, y2, x1, x2 = (int(v) for v in box)
    outside = torch.ones(before.shape[-2:], dtype=torch.bool)
    outside[y1:y2, x1:x2] = False
    if not torch.equal(before[..., outside], after[..., outside]):
        raise RuntimeError(f"layer {layer}: the maps before and after the paste differ outside the box {box}")


def strongest_channels(fmap: torch.Tensor, k: int) -> list[int]:
    """The `k` channels (or all, if fewer) of one sample's map (C, h, w) with the largest spatial variance."""
    return fmap.flatten(1).var(1).argsort(descending=True)[:k].tolist()


def _image_axis(ax: Any, image: torch.Tensor, title: str = "") -> None:
    ax.imshow(image.squeeze(0), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _draw_grid_and_box(ax: Any, grid: tuple[int, int], box: Sequence[int], size: tuple[int, int]) -> None:
    """The layer's grid cells and its box (y1, y2, x1, x2 in cells), scaled onto an image of `size` pixels."""
    (h, w), (H, W) = grid, size
    sy, sx = H / h, W / w
    if h < H:  # a coarser grid than the image: show its cells
        for i in range(1, h):
            ax.axhline(i * sy - 0.5, color="white", lw=0.3, alpha=0.5)
        for j in range(1, w):
            ax.axvline(j * sx - 0.5, color="white", lw=0.3, alpha=0.5)
    y1, y2, x1, x2 = box
    rect = pyplot().Rectangle((x1 * sx - 0.5, y1 * sy - 0.5), (x2 - x1) * sx, (y2 - y1) * sy, fill=False,
                              edgecolor="red", lw=1.2)
    ax.add_patch(rect)


def _map_axis(ax: Any, fmap: torch.Tensor, box: Sequence[int], lo: float, hi: float, title: str) -> None:
    ax.imshow(fmap, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
    y1, y2, x1, x2 = box
    ax.add_patch(pyplot().Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor="red", lw=0.8))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=6)


def plot_layers(images: torch.Tensor, mixes: list[dict[str, Any]], path: Path, channels: int, dpi: int) -> Path:
    """layers.png: per layer, the box on its grid over sample 0, then channels before / after the paste."""
    plt = pyplot()
    cols = 2 + 2 * channels
    fig, axes = plt.subplots(len(mixes), cols, figsize=(1.25 * cols, 1.4 * len(mixes)), dpi=dpi, squeeze=False)
    for row, mix in zip(axes, mixes):
        layer, (h, w) = mix["layer"], mix["grid"]
        _image_axis(row[0], images[0], f"index {layer}: {LAYER_NAMES.get(layer, '')}")
        _draw_grid_and_box(row[0], mix["grid"], mix["box"], tuple(images.shape[-2:]))
        row[0].set_ylabel(f"{h}x{w} grid", fontsize=6)
        _image_axis(row[1], (mix["after"][0] * 0.5 + 0.5).clamp(0, 1) if layer == 0 else images[mix_partner(mix)],
                    "mixed input" if layer == 0 else "partner image")
        before, after = mix["before"][0], mix["after"][0]
        picks = strongest_channels(before, channels)
        for ax in row[2 + 2 * len(picks):]:  # fewer channels than columns (a grey image has one)
            ax.axis("off")
        for k, c in enumerate(picks):
            lo, hi = float(torch.minimum(before[c], after[c]).min()), float(torch.maximum(before[c], after[c]).max())
            _map_axis(row[2 + 2 * k], before[c], mix["box"], lo, hi, f"ch {c} before")
            _map_axis(row[3 + 2 * k], after[c], mix["box"], lo, hi, f"ch {c} after")
    lams = ", ".join(f"{m['lam']:.2f}" for m in mixes)
    fig.suptitle(f"One draw, one batch: CutMix at layer index 0-4 of a CIFAR ResNet-8 (lam on each grid: {lams})",
                 fontsize=8)
    return _save(fig, path)


def mix_partner(mix: dict[str, Any]) -> int:
    """The partner of sample 0: the sample whose map fills sample 0's box after the paste."""
    y1, y2, x1, x2 = mix["box"]
    inside_after = mix["after"][0][..., y1:y2, x1:x2]
    inside_before = mix["before"][..., y1:y2, x1:x2]
    errors = (inside_before - inside_after.unsqueeze(0)).abs().flatten(1).sum(1)
    return int(errors.argmin())


def mix_kinds(images: torch.Tensor, labels: torch.Tensor, seed: int) -> list[tuple[str, torch.Tensor]]:
    """The batch through CutMix, Mixup, Cutout and per-sample CutMix (each from its own seeded generator)."""
    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(seed)
    transforms = [("CutMix", featmix.CutMix(num_classes=10, generator=gen())),
                  ("Mixup", featmix.Mixup(num_classes=10, generator=gen())),
                  ("Cutout", featmix.Cutout(size=0.5, num_classes=10, generator=gen())),
                  ('CutMix, mode="elem"', featmix.CutMix(num_classes=10, generator=gen(), mode="elem"))]
    return [(name, t(images.clone(), labels)[0]) for name, t in transforms]


def plot_kinds(images: torch.Tensor, rows: list[tuple[str, torch.Tensor]], path: Path, dpi: int) -> Path:
    """kinds.png: the original batch, then one row per kind."""
    plt = pyplot()
    n = images.shape[0]
    fig, axes = plt.subplots(len(rows) + 1, n, figsize=(1.1 * n, 1.2 * (len(rows) + 1)), dpi=dpi, squeeze=False)
    for r, (name, batch) in enumerate([("original", images)] + rows):
        for i in range(n):
            _image_axis(axes[r][i], batch[i])
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.suptitle("One batch, four kinds at the input (batch mode shares one box; elem draws one per sample)",
                 fontsize=8)
    return _save(fig, path)


def plot_cutmix_row(images: torch.Tensor, labels: torch.Tensor, seed: int, path: Path, dpi: int) -> Path:
    """cutmix.png: CutMix-ed images with the two classes each target weighs."""
    mixed, targets = featmix.CutMix(num_classes=10, generator=torch.Generator().manual_seed(seed))(images.clone(),
                                                                                                    labels)
    plt = pyplot()
    n = images.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(1.2 * n, 1.55), dpi=dpi, squeeze=False)
    for i, ax in enumerate(axes[0]):
        top = targets[i].topk(2)
        parts = [f"{CLASSES[int(c)]} {float(v):.2f}" for v, c in zip(top.values, top.indices) if v > 0]
        _image_axis(ax, mixed[i], "\n".join(parts))
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """`python -m experiments.gallery`: write the pictures; returns their paths."""
    p = argparse.ArgumentParser(prog="python -m experiments.gallery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/img", help="folder for the PNGs (default: docs/img)")
    p.add_argument("--seed", type=int, default=0, help="the seed of images, model and draws (default: 0)")
    p.add_argument("--samples", type=int, default=8, help="images in the batch (default: 8)")
    p.add_argument("--channels", type=int, default=3, help="feature channels shown per layer (default: 3)")
    p.add_argument("--dpi", type=int, default=150, help="resolution of the PNGs (default: 150)")
    p.add_argument("--data-dir", help="where Fashion-MNIST's files are (default: Debian's folder)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels, source = load_batch(args.samples, args.seed, args.data_dir)
    mixes = [mix_at_layer(images, labels, layer, args.seed) for layer in range(5)]
    paths = [plot_layers(images, mixes, out / "layers.png", args.channels, args.dpi),
             plot_kinds(images, mix_kinds(images, labels, args.seed), out / "kinds.png", args.dpi),
             plot_cutmix_row(images, labels, args.seed, out / "cutmix.png", args.dpi)]
    print(f"{source}, seed {args.seed}: " + ", ".join(map(str, paths)))
    return paths


if __name__ == "__main__":
    main()
