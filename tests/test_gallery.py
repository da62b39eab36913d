"""The gallery (`python -m experiments.gallery`): it writes valid PNGs, from the data or without it."""
from __future__ import annotations

import pytest
import torch

from experiments import data, gallery

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_pngs(paths, out):
    import matplotlib.image

    assert sorted(p.name for p in paths) == ["cutmix.png", "kinds.png", "layers.png"]
    for p in paths:
        assert p.parent == out and p.read_bytes()[:8] == PNG_MAGIC
        pixels = matplotlib.image.imread(p)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 50 and pixels.std() > 0  # decodes, not blank


def test_gallery_writes_valid_pngs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")  # offline, no data: synthetic images
    out = tmp_path / "img"
    paths = gallery.main(["--out", str(out), "--samples", "4", "--channels", "1", "--dpi", "40"])
    _check_pngs(paths, out)
    assert "synthetic images, seed 0" in capsys.readouterr().out


def test_every_layer_pastes_inside_the_recorded_box():
    images, labels, _ = gallery.load_batch(8, seed=0, data_dir=None)
    grids = []
    for layer in range(5):
        mix = gallery.mix_at_layer(images, labels, layer, seed=0)  # raises if anything changed outside the box
        (h, w), (y1, y2, x1, x2) = mix["grid"], mix["box"]
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w and mix["before"].shape[-2:] == (h, w)
        assert mix["lam"] == pytest.approx(1 - (y2 - y1) * (x2 - x1) / (h * w))
        assert not torch.equal(mix["before"], mix["after"])
        grids.append((h, w))
    assert grids == [(28, 28), (28, 28), (28, 28), (14, 14), (7, 7)]


def test_the_check_catches_a_change_outside_the_box():
    before = torch.zeros(2, 3, 8, 8)
    after = before.clone()
    after[..., 2:4, 2:4] = 1
    gallery.check_paste_inside_box(before, after, (2, 4, 2, 4), layer=2)
    after[..., 0, 0] = 1
    with pytest.raises(RuntimeError, match="outside the box"):
        gallery.check_paste_inside_box(before, after, (2, 4, 2, 4), layer=2)
