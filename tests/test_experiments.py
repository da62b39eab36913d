"""Tests of the experiment engine and the four studies (CPU, tiny synthetic data, seconds each)."""
from __future__ import annotations

import csv
import gzip
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import (
    alpha_sweep,
    compare,
    data,
    depth_ablation,
    engine,
    feature_cutmix,
    options,
    results,
    runs,
    variants,
)
from experiments.data import TensorData, balanced_subset, random_crop_flip, read_idx
from experiments.engine import RunConfig, Setting, lr_factor, train_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--model", "resnet8_cifar", "--model-kwargs", "width=4", "--epochs", "1",
        "--seeds", "0", "--eval-batch-size", "64", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these workloads are tiny, and spinning OpenMP threads crawl on a shared CPU.
    The suite's own setting is restored afterwards (the studies also set it, via --threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- data

def _write_idx(path: Path, t: torch.Tensor, compress: bool) -> None:
    code = {torch.uint8: 0x08, torch.int32: 0x0C}[t.dtype]
    header = bytes([0, 0, code, t.dim()]) + b"".join(d.to_bytes(4, "big") for d in t.shape)
    body = t.numpy().astype(">u1" if t.dtype == torch.uint8 else ">i4").tobytes()
    raw = header + body
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    imgs = torch.randint(0, 256, (5, 4, 3), dtype=torch.uint8)
    ints = torch.tensor([1, -2, 300000], dtype=torch.int32)
    _write_idx(tmp_path / "a", imgs, compress)
    _write_idx(tmp_path / "b", ints, compress)
    assert torch.equal(read_idx(tmp_path / "a"), imgs)
    assert torch.equal(read_idx(tmp_path / "b"), ints)  # big-endian decoding
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01" + (9).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "bad")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "junk")


def _fake_fashion(d: Path, n_train: int = 40, n_test: int = 20) -> None:
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g,
                                                                      dtype=torch.uint8), True)
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", (torch.arange(n) % 10).to(torch.uint8), True)


def test_fashion_mnist_from_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout under --data-dir
    raw.mkdir(parents=True)
    _fake_fashion(raw)
    d = data.load_dataset("fashion-mnist", str(tmp_path))
    assert d.train_x.shape == (40, 1, 28, 28) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (20, 1, 28, 28) and d.num_classes == 10 and d.pad == 2
    assert abs(d.mean[0] - d.train_x.double().mean().item() / 255) < 1e-9


def test_missing_dataset_error_names_the_options(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("fashion-mnist", str(tmp_path / "empty"))
    msg = str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "--data-dir" in msg and "--download" in msg
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("mnist-typo")


def test_random_crop_flip_shapes_and_determinism():
    x = torch.randint(0, 256, (16, 3, 12, 10), dtype=torch.uint8)
    a = random_crop_flip(x, 2, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, 2, torch.Generator().manual_seed(3))
    c = random_crop_flip(x, 2, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_flip_is_a_crop_of_the_padded_image_and_flips():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (64, 2, 8, 8), dtype=torch.uint8)  # no zeros: padding is recognisable
    pad = 2
    out = random_crop_flip(x, pad, torch.Generator().manual_seed(0))
    xp = torch.nn.functional.pad(x, (pad,) * 4)
    flips = 0
    for i in range(64):
        windows = [xp[i, :, oy:oy + 8, ox:ox + 8] for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)]
        plain = any(torch.equal(out[i], w) for w in windows)
        flipped = any(torch.equal(out[i], w.flip(-1)) for w in windows)
        assert plain or flipped, f"sample {i} is not a (flipped) window of its padded image"
        flips += flipped and not plain
    assert 15 < flips < 49  # about half are flipped
    nopad = random_crop_flip(x, 0, torch.Generator().manual_seed(1))
    is_flip = torch.tensor([torch.equal(nopad[i], x[i].flip(-1)) for i in range(64)])
    is_same = torch.tensor([torch.equal(nopad[i], x[i]) for i in range(64)])
    assert (is_flip | is_same).all() and is_flip.any() and is_same.any()
    assert not random_crop_flip(x, 0, torch.Generator().manual_seed(1), flip=False).ne(x).any()


def test_balanced_subset_and_shards():
    labels = torch.arange(1000) % 10
    idx = balanced_subset(labels, 100, torch.Generator().manual_seed(0))
    assert idx.unique().numel() == 100
    assert torch.bincount(labels[idx], minlength=10).tolist() == [10] * 10
    assert torch.equal(idx, balanced_subset(labels, 100, torch.Generator().manual_seed(0)))
    d = data.make_synthetic(n_train=50)
    shards = []
    for rank in range(2):
        ys = [y for _, y in d.train_batches(8, torch.Generator().manual_seed(0), torch.Generator().manual_seed(rank),
                                            rank=rank, world_size=2)]
        shards.append(torch.cat(ys))
    assert len(shards[0]) == len(shards[1]) == 25  # ranks take the same number of steps


# ---------------------------------------------------------------- engine

def test_lr_schedules():
    assert lr_factor(0, 100, 10, "onecycle") == pytest.approx(0.04)
    assert lr_factor(25, 100, 10, "onecycle") == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, "onecycle") < 0.02
    # 10 epochs of 10 steps: /10 from epoch 5 (0-based), /100 from epoch 8 (>= 7.5)
    assert [lr_factor(s, 100, 10, "step") for s in (49, 50, 79, 80)] == pytest.approx([1, 0.1, 0.1, 0.01])
    # the paper's 300 epochs: drops at epochs 150 and 225
    assert [lr_factor(e * 5, 1500, 5, "step") for e in (149, 150, 224, 225)] == pytest.approx([1, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, 1, "linear")


@pytest.mark.parametrize("schedule", ["onecycle", "step", "cosine"])
def test_lr_schedule_trains_each_step_at_the_hand_written_lr(schedule):
    """torch's LambdaLR drives the optimiser: step k's lr is cfg.lr * lr_factor(k), bit for bit, and its
    state_dict carries where the schedule stands (what an exact resume needs)."""
    cfg = RunConfig(lr=0.2, schedule=schedule)
    total, per_epoch = 120, 8
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr, momentum=0.9, nesterov=True)
    sched = engine.lr_schedule(opt, cfg, total, per_epoch)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [cfg.lr * lr_factor(k, total, per_epoch, schedule) for k in range(total)]
    assert sched.state_dict()["last_epoch"] == total


def test_seed_k_pairs_baseline_and_cutmix():
    """With cutmix_prob 0 a CutMix run must reproduce the baseline of the same seed exactly: same initial
    weights, data order and augmentation; only the mixing stream differs between settings."""
    d = data.make_synthetic()
    cfg = RunConfig(model="resnet8_cifar", model_kwargs={"width": 4}, epochs=2, batch_size=16, eval_every=1,
                    cutmix_prob=0.0)
    m_base, s_base = train_run(cfg, Setting("baseline"), 3, d)
    m_mix, s_mix = train_run(cfg, Setting("layer2", layer=2), 3, d)
    _, s_other = train_run(cfg, Setting("baseline"), 4, d)
    assert all(torch.equal(s_base[k], s_mix[k]) for k in s_base)
    for a, b in zip(m_base["history"], m_mix["history"]):  # soft vs index targets: loss equal to rounding
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert (a["train_acc"], a["top1_err"]) == (b["train_acc"], b["top1_err"])
    assert not all(torch.equal(s_base[k], s_other[k]) for k in s_base)
    cfg.cutmix_prob = 1.0
    _, s_on = train_run(cfg, Setting("layer2", layer=2), 3, d)
    assert not all(torch.equal(s_base[k], s_on[k]) for k in s_base)


def test_evaluate_counts_top1_and_top5():
    class Fixed(torch.nn.Module):  # always ranks class 0 first, then 1, 2, ...
        def forward(self, x):
            return torch.arange(10, 0, -1, dtype=torch.float32).expand(x.shape[0], 10)
    y = torch.arange(200) % 10
    x = torch.zeros(200, 1, 4, 4, dtype=torch.uint8)
    d = TensorData("t", x, y, x, y, 10, (0.5,), (0.5,), pad=0)
    top1, top5 = engine.evaluate(Fixed(), d, RunConfig(eval_batch_size=64), engine.DistInfo())
    assert top1 == pytest.approx(90.0) and top5 == pytest.approx(50.0)


# ---------------------------------------------------------------- results

def _row(setting, seed, final, best=None):
    return {"setting": setting, "seed": seed, "final_top1_err": final, "best_top1_err": best or final,
            "final_top5_err": 1.0, "best_top5_err": 1.0}


def test_summary_paired_differences():
    rows = [_row("baseline", s, e) for s, e in enumerate([10.0, 12.0, 14.0])]
    rows += [_row("a", s, e) for s, e in enumerate([9.0, 11.0, 13.5])]        # Δ = -1, -1, -0.5
    rows += [_row("b", s, e) for s, e in enumerate([11.0, 10.0, 15.0])]       # Δ = +1, -2, +1
    rows += [_row("c", 0, 8.0), _row("c", 7, 1.0)]                              # seed 7 has no baseline
    stats = {s["setting"]: s for s in results.summarize(rows, ["baseline", "a", "b", "c"])}
    m, sd = stats["a"]["diff_final_top1_err"]
    assert m == pytest.approx(-5 / 6) and sd == pytest.approx(math.sqrt(1 / 12))
    # 95 % t-interval, 2 degrees of freedom: -5/6 ± 4.303 · sqrt(1/12) / sqrt(3) = [-1.55, -0.12]
    low, high = stats["a"]["interval"].low, stats["a"]["interval"].high
    half = 4.302653 * math.sqrt(1 / 12) / math.sqrt(3)
    assert (low, high) == (pytest.approx(-5 / 6 - half, abs=1e-6), pytest.approx(-5 / 6 + half, abs=1e-6))
    assert stats["a"]["interval"].excludes_zero and stats["a"]["wins"] == 3 and stats["a"]["n_pairs"] == 3
    assert stats["b"]["diff_final_top1_err"][0] == pytest.approx(0.0) and not stats["b"]["interval"].excludes_zero
    assert stats["b"]["wins"] == 1
    # unpaired seeds count in the raw mean but not in the paired difference
    assert stats["c"]["n"] == 2 and stats["c"]["final_top1_err"][0] == pytest.approx(4.5)
    assert stats["c"]["n_pairs"] == 1 and stats["c"]["diff_final_top1_err"][0] == pytest.approx(-2.0)
    assert not stats["c"]["interval"].defined  # one pair: no interval
    assert stats["baseline"]["final_top1_err"] == pytest.approx((12.0, 2.0))
    table = results.markdown_table(list(stats.values()))
    assert "-0.83 ± 0.29" in table and "| a | 3 |" in table and "3/3 | [-1.55, -0.12] | yes |" in table
    assert "| 1/3 | [-4.30, +4.30] | no: includes 0 |" in table and "| 1/1 | n too small | n too small |" in table


# ---------------------------------------------------------------- studies

STUDIES = [
    (depth_ablation, "depth.png", ["baseline", "layer0", "layer1", "layer2", "layer3", "layer4"]),
    (alpha_sweep, "alpha.png", ["baseline", "alpha0.1", "alpha0.25", "alpha0.5", "alpha1", "alpha2", "alpha4"]),
    (variants, "variants.png", ["baseline", "cutmix", "center_gaussian", "fixed_size", "scheduled", "one_hot",
                                "complete_label"]),
    (feature_cutmix, "feature_cutmix.png", ["baseline", "input", "feature_random"]),
    (compare, "compare.png", ["baseline", "mixup", "manifold_mixup", "cutout", "feature_cutmix", "cutmix"]),
]


@pytest.mark.parametrize("mod,png,names", STUDIES, ids=[s[0].__name__.split(".")[-1] for s in STUDIES])
def test_study_smoke(tmp_path, capsys, mod, png, names):
    out = mod.main(TINY + ["--out", str(tmp_path)])
    assert out == tmp_path
    for f in ("results.jsonl", "results.csv", "summary.md", "config.json", png):
        assert (tmp_path / f).is_file() and (tmp_path / f).stat().st_size > 0, f
    rows = results.load_rows(tmp_path)
    assert [r["setting"] for r in rows] == names
    for r in rows:
        assert set(results.ROW_KEYS) <= set(r)
        assert 0 <= r["final_top1_err"] <= 100 and r["images_per_s"] > 0 and r["train_size"] == 64
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert tuple(csv_rows[0]) == results.ROW_KEYS and len(csv_rows) == len(names)
    ck = torch.load(tmp_path / "ckpt" / f"{names[1]}_seed0.pt", weights_only=False)
    for key in ("model_state", "model", "model_kwargs", "num_classes", "in_chans", "dataset", "mean", "std",
                "config", "metrics", "setting", "seed"):
        assert key in ck, key
    import timm
    net = timm.create_model(ck["model"], num_classes=ck["num_classes"], in_chans=ck["in_chans"], **ck["model_kwargs"])
    net.load_state_dict(ck["model_state"])  # the checkpoint loads into the plain model
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {n} | 1 |" in summary for n in names) and "95 % paired t-interval of Δ" in summary
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["options"]["epochs"] == 1 and len(cfg["settings"]) == len(names)
    printed = capsys.readouterr().out
    assert "| baseline |" in printed and f"plot: {tmp_path / png}" in printed


def test_resume_skips_finished_runs(tmp_path, monkeypatch, capsys):
    calls = []
    real = runs.train_run

    def counting(cfg, setting, seed, *a, **k):
        calls.append((setting.name, seed))
        return real(cfg, setting, seed, *a, **k)
    monkeypatch.setattr(runs, "train_run", counting)
    args = TINY + ["--out", str(tmp_path), "--layers", "0", "2"]
    depth_ablation.main(args)
    assert len(calls) == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()}
    depth_ablation.main(args)
    assert len(calls) == 3  # nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()} == mtimes
    (tmp_path / "ckpt" / "layer2_seed0.pt").unlink()  # a run whose checkpoint is gone is redone
    depth_ablation.main(args + ["--seeds", "0", "1"])  # and a new seed adds its runs
    assert calls[3:] == [("layer2", 0), ("baseline", 1), ("layer0", 1), ("layer2", 1)]
    assert "| layer2 | 2 |" in (tmp_path / "summary.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        depth_ablation.main(args + ["--epochs", "2"])  # the last --epochs wins
    assert e.value.code == 2
    assert re.search(r"different configuration.*'epochs': \(1, 2\)", capsys.readouterr().err)


def test_help_documents_options(capsys):
    for mod, extra in ((depth_ablation, "--layers"), (alpha_sweep, "--alphas"), (variants, "--variants"),
                       (feature_cutmix, "--feature-layers")):
        with pytest.raises(SystemExit):
            mod.main(["--help"])
        text = capsys.readouterr().out
        for opt in ("--model", "--dataset", "--data-dir", "--download", "--train-subset", "--epochs", "--batch-size",
                    "--lr", "--wd", "--cutmix-prob", "--alpha", "--seeds", "--recipe", "--device", "--amp",
                    "--channels-last", "--compile", "--out", "--eval-every", "--no-progress", "--smoke", extra):
            assert opt in text, (mod.__name__, opt)


def test_recipes_resolve():
    p = options.build_parser("x", "")
    opts = options.resolve(p.parse_args(["--recipe", "paper-cifar", "--epochs", "3"]))
    assert opts.model == "pyramidnet200_a240" and opts.dataset == "cifar100" and opts.lr == 0.25
    assert opts.batch_size == 64 and opts.schedule == "step" and opts.epochs == 3
    smoke = options.resolve(p.parse_args(["--smoke"]))
    assert smoke.epochs == 1 and smoke.train_subset == 256 and smoke.seeds == [0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "experiments.depth_ablation", *TINY, "--layers", "0",
           "--device", "cpu", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = results.load_rows(tmp_path)
    assert [r["setting"] for r in rows] == ["baseline", "layer0"]  # written once, by rank 0
    assert all(r["world_size"] == 2 and r["test_size"] == 64 for r in rows)
    assert proc.stdout.count("| layer0 |") == 1
    assert len(list((tmp_path / "ckpt").glob("*.pt"))) == 2


def test_imagefolder_study(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(6):
                px = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(tmp_path / "img" / split / c / f"{i}.png")
    d = data.load_dataset(f"imagefolder:{tmp_path / 'img'}", image_size=16, workers=0)
    assert (d.num_classes, d.num_train, d.num_test, d.input_size) == (2, 12, 12, (3, 16, 16))
    xs = [x for x, _ in d.train_batches(5, torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))]
    assert [x.shape[0] for x in xs] == [5, 5, 2] and xs[0].shape[1:] == (3, 16, 16) and xs[0].dtype == torch.float32
    out = depth_ablation.main(["--dataset", f"imagefolder:{tmp_path / 'img'}", "--image-size", "16", "--workers", "0",
                               "--model-kwargs", "width=4", "--epochs", "1", "--seeds", "0", "--layers", "1",
                               "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "run")])
    rows = results.load_rows(out)
    assert [r["setting"] for r in rows] == ["baseline", "layer1"] and rows[0]["test_size"] == 12
    with pytest.raises(FileNotFoundError, match="train"):
        data.load_dataset(f"imagefolder:{tmp_path / 'nothing'}")


def test_compare_writes_table3_with_the_papers_numbers_and_each_kind(tmp_path):
    compare.main(TINY + ["--out", str(tmp_path)])
    table = (tmp_path / "table3.md").read_text()
    for label, imagenet, cifar in compare.PAPER.values():
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        assert f"| {imagenet:.2f} |" in row and (cifar is None or f"| {cifar:.2f} |" in row)
    kinds = {r["setting"]: (r["kind"], r["layer"]) for r in results.load_rows(tmp_path)}
    assert kinds == {"baseline": (None, None), "mixup": ("mixup", 0), "manifold_mixup": ("mixup", "random"),
                     "cutout": ("cutout", 0), "feature_cutmix": ("cutmix", "random"), "cutmix": ("cutmix", 0)}
