"""experiments.evaluation's shape: shared model calls score exactly what one setting at a time scores,
the grid subset, the --full / default grids, the progress bars and the measurement registry."""
from __future__ import annotations

import pytest
import timm
import torch

import models  # noqa: F401  (registers resnet8_cifar)
from experiments.data import make_synthetic
from experiments.evaluation import command, runner
from experiments.evaluation.base import EVAL_SEED, GRID_SEED, EvalOptions, Measurement
from experiments.evaluation.inbetween import MIXERS, partner_indices
from experiments.evaluation.occlusion import occlude, occlusion_effect, occlusion_sizes

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    """An untrained ResNet-8 (its predictions are varied enough) on 48 synthetic 16x16 test images."""
    torch.manual_seed(0)
    net = timm.create_model("resnet8_cifar", num_classes=4, in_chans=1, width=4).eval()
    data = make_synthetic(n_train=8, n_test=48, size=16)
    return net, data


def _predict(net, data, x):
    with torch.no_grad():
        return net(data.normalizer(x)).argmax(1)


def _occlusion_one_at_a_time(net, data, index, batch_size, steps):
    """Accuracy per (mode, size): every setting run on its own, images of `index` in batches."""
    sizes = occlusion_sizes(16, steps)
    hits = {m: [0] * len(sizes) for m in ("center", "boundary")}
    for s in range(0, index.numel(), batch_size):
        i = index[s:s + batch_size]
        x, y = data.test_x[i].float().div(255), data.test_y[i]
        for mode in hits:
            for k, size in enumerate(sizes):
                hits[mode][k] += int((_predict(net, data, occlude(x, size, mode)) == y).sum())
    return {m: [100 * h / index.numel() for h in v] for m, v in hits.items()}


def _inbetween_one_at_a_time(net, data, index, batch_size, lams):
    """Accuracy (label of the larger part) per (kind, lam), every mix run on its own, partners drawn as the
    measurement draws them."""
    gen = torch.Generator().manual_seed(EVAL_SEED)
    hits = {k: [0] * len(lams) for k in MIXERS}
    for s in range(0, index.numel(), batch_size):
        i = index[s:s + batch_size]
        x, y = data.test_x[i].float().div(255), data.test_y[i]
        partner = partner_indices(y, gen)
        for kind, mix in MIXERS.items():
            for k, lam in enumerate(lams):
                xm, share = mix(x, x[partner], lam)
                major = y if share >= 0.5 else y[partner]
                hits[kind][k] += int((_predict(net, data, xm) == major).sum())
    return {k: [100 * h / index.numel() for h in v] for k, v in hits.items()}


@pytest.mark.parametrize("forward_batch", [1, 7, 4096])
def test_shared_model_calls_score_what_one_setting_at_a_time_scores(tiny, forward_batch):
    net, data = tiny
    lams = (0.0, 0.2, 0.5, 0.8, 1.0)
    opts = EvalOptions(metrics=("occlusion", "inbetween"), batch_size=20, occlusion_steps=4, lams=lams,
                       forward_batch=forward_batch)
    rep = runner.evaluate_model(net, data, data.normalizer, opts)
    everything = torch.arange(data.num_test)
    want_occ = _occlusion_one_at_a_time(net, data, everything, 20, 4)
    want_inb = _inbetween_one_at_a_time(net, data, everything, 20, lams)
    assert rep["occlusion"]["center"] == want_occ["center"] and rep["occlusion"]["boundary"] == want_occ["boundary"]
    assert rep["inbetween"]["cutmix"]["major"] == want_inb["cutmix"]
    assert rep["inbetween"]["mixup"]["major"] == want_inb["mixup"]
    assert len(set(want_occ["center"])) > 1  # the curves are not flat: the comparison means something


def test_grid_subset_is_fixed_balanced_and_scored_like_the_rest(tiny):
    net, data = tiny
    opts = EvalOptions(metrics=("occlusion", "inbetween", "fgsm"), batch_size=20, occlusion_steps=4,
                       lams=(0.0, 0.5, 1.0), grid_images=24)
    rep = runner.evaluate_model(net, data, data.normalizer, opts)
    from experiments.data import balanced_subset
    index = balanced_subset(data.test_y, 24, torch.Generator().manual_seed(GRID_SEED)).sort().values
    assert torch.bincount(data.test_y[index]).tolist() == [6, 6, 6, 6]
    assert rep["occlusion"]["n"] == rep["inbetween"]["n"] == 24 and rep["test_size"] == 48
    want = _occlusion_one_at_a_time(net, data, index, 20, 4)
    assert rep["occlusion"]["center"] == want["center"] and rep["occlusion"]["boundary"] == want["boundary"]
    want_inb = _inbetween_one_at_a_time(net, data, index, 20, (0.0, 0.5, 1.0))
    assert rep["inbetween"]["mixup"]["major"] == want_inb["mixup"]
    again = runner.evaluate_model(net, data, data.normalizer, opts)
    assert again["occlusion"] == rep["occlusion"] and again["inbetween"] == rep["inbetween"]


def test_occlusion_effect_names_the_settings_that_need_no_model_call():
    assert occlusion_effect(28, 28, 0, "center") == "clean" and occlusion_effect(28, 28, 28, "boundary") == "clean"
    assert occlusion_effect(28, 28, 28, "center") == "blank" and occlusion_effect(28, 28, 0, "boundary") == "blank"
    assert occlusion_effect(28, 28, 14, "center") == occlusion_effect(28, 28, 14, "boundary") == "partial"
    assert occlusion_effect(16, 32, 16, "center") == "partial"  # a 16 x 16 hole leaves half of a 16 x 32 image
    assert occlusion_effect(16, 32, 32, "center") == "blank"


def _args(*argv):
    return command.parse_args(["--ckpt", "x.pt", *argv])


def test_default_and_full_grids():
    cpu = torch.device("cpu")
    default = command.eval_options(_args(), cpu)
    assert (default.occlusion_steps, default.lams, default.grid_images) == (4, (0.0, 0.2, 0.5, 0.8, 1.0), 2000)
    assert default.forward_batch == 128 and default.batch_size == 500
    full = command.eval_options(_args("--full"), cpu)
    assert (full.occlusion_steps, full.grid_images) == (8, 0) and full.lams == tuple(k / 10 for k in range(11))
    # the default grid is part of the full one, so the shared settings can be compared
    assert set(occlusion_sizes(28, 4)) <= set(occlusion_sizes(28, 8)) and set(default.lams) <= set(full.lams)
    mixed = command.eval_options(_args("--full", "--lams", "0.5", "--grid-images", "100"), cpu)
    assert (mixed.occlusion_steps, mixed.lams, mixed.grid_images) == (8, (0.5,), 100)  # explicit options win


def test_progress_bar_per_measurement_and_timings(tiny, capsys):
    net, data = tiny
    opts = EvalOptions(metrics=("fgsm", "calibration", "ood"), batch_size=16, ood_size=16)
    rep = runner.evaluate_model(net, data, data.normalizer, opts, progress=True, label="ckpt")
    err = capsys.readouterr().err
    for name in ("ckpt clean", "ckpt fgsm", "ckpt ood"):
        assert name in err, name
    assert set(rep["time_s"]) == {"clean", "fgsm", "calibration", "ood"} and rep["eval_time_s"] > 0


def test_registry_runs_in_a_fixed_order_and_every_measurement_has_the_shape():
    assert runner.METRICS == ("fgsm", "occlusion", "inbetween", "ood", "calibration", "localization")
    for name, m in runner.MEASUREMENTS.items():
        assert issubclass(m, Measurement) and m.name == name and m.columns
        for key, (title, path) in m.columns.items():
            assert isinstance(title, str) and path and all(isinstance(p, str) for p in path)


def test_unknown_metric_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        command.parse_args(["--ckpt", "x.pt", "--metrics", "fgsm,nonsense"])
    assert "unknown metric(s) ['nonsense']; choose from fgsm,occlusion" in capsys.readouterr().err
