"""The studies' command line: fail fast and plainly, help with every default once, results
rounded to what was measured, the CUDA fast path switched by device, --jobs' placement, no import-time effects."""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import (
    alpha_sweep,
    depth_ablation,
    feature_cutmix,
    options,
    results,
    runs,
    study,
    throughput,
    variants,
)
from experiments.cli import HelpFormatter, UsageError
from experiments.fast import fast_defaults, uses_cuda_graphs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--model", "resnet8_cifar", "--model-kwargs", "width=4", "--epochs", "1",
        "--seeds", "0", "--eval-batch-size", "64", "--no-progress", "--threads", "1"]
STUDIES = (depth_ablation, alpha_sweep, variants, feature_cutmix)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Each test in its own working directory: a default --out (runs/<study>) never meets a real study's."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- the fast path, per device

def test_fast_defaults_switch_on_with_cuda_only():
    cuda = fast_defaults("cuda")
    assert (cuda.amp, cuda.channels_last, cuda.compile, cuda.compile_mode) == (True, True, True, "reduce-overhead")
    assert uses_cuda_graphs(cuda.compile, cuda.compile_mode, cuda.compile_backend)
    ddp = fast_defaults("cuda", world_size=2)  # CUDA graphs do not capture DDP's gradient hooks
    assert ddp.compile and ddp.compile_mode == "default" and not uses_cuda_graphs(True, "default", "inductor")
    cpu = fast_defaults("cpu")
    assert (cpu.amp, cpu.channels_last, cpu.compile, cpu.compile_mode) == (False, False, False, "default")
    opted_out = fast_defaults("cuda", amp=False, channels_last=False, compile=False)
    assert (opted_out.amp, opted_out.channels_last, opted_out.compile) == (False, False, False)
    asked = fast_defaults("cpu", amp=True, compile=True, compile_mode="max-autotune")
    assert asked.amp and asked.compile and not asked.channels_last and asked.compile_mode == "max-autotune"
    assert not uses_cuda_graphs(True, "reduce-overhead", "aot_eager")
    with pytest.raises(ValueError, match="--compile-mode: expected one of .*got 'fast'"):
        fast_defaults("cuda", compile_mode="fast")


@pytest.mark.parametrize("flags,device,expected", [
    ([], "cuda", (True, True, True)),
    (["--no-amp", "--no-channels-last", "--no-compile"], "cuda", (False, False, False)),
    (["--no-compile"], "cuda", (True, True, False)),
    ([], "cpu", (False, False, False)),
    (["--amp", "--channels-last", "--compile"], "cpu", (True, True, True)),  # the old opt-in flags still work
])
def test_speed_flags_resolve_per_device(flags, device, expected):
    opts = options.resolve(options.build_parser("x", "").parse_args(flags))
    study.apply_fast_defaults(opts, device, 1)
    assert (opts.amp, opts.channels_last, opts.compile) == expected


def test_default_cpu_study_keeps_its_configuration_hash():
    """The new options are speed-only: the default CPU study is still configuration 57c6db671a44, so its
    output directory, summary header and checkpoints stay valid."""
    p = options.study_parser("depth_ablation", "", depth_ablation.DepthOptions)
    opts = options.resolve(p.parse_args([]), depth_ablation.DepthOptions)
    study.apply_fast_defaults(opts, "cpu", 1)
    assert options.config_hash("depth_ablation", opts) == "57c6db671a44"
    opts.jobs, opts.max_minutes, opts.compile_mode = 4, 30.0, "max-autotune"
    assert options.config_hash("depth_ablation", opts) == "57c6db671a44"


def test_options_are_typed_per_study():
    """A study's own options are fields of its StudyOptions subclass, parsed from its flags; an option the
    dataclass lacks is an error, not a silently dropped value."""
    p = options.study_parser("alpha_sweep", "", alpha_sweep.AlphaOptions)
    opts = options.resolve(p.parse_args(["--alphas", "0.5", "2", "--layer", "3", "--epochs", "7"]),
                           alpha_sweep.AlphaOptions)
    assert type(opts) is alpha_sweep.AlphaOptions and isinstance(opts, options.StudyOptions)
    assert (opts.alphas, opts.layer, opts.epochs, opts.model) == ([0.5, 2.0], 3, 7, "resnet8_cifar")
    assert [s.name for s in alpha_sweep.make_settings(opts)] == ["baseline", "alpha0.5", "alpha2"]
    assert options.resolve(p.parse_args([]), alpha_sweep.AlphaOptions).alphas == [0.1, 0.25, 0.5, 1.0, 2.0, 4.0]
    with pytest.raises(TypeError, match="no field for the options.*alphas"):
        options.resolve(p.parse_args([]), options.StudyOptions)


def test_jobs_placement():
    assert runs.job_devices("cuda", None, 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert runs.job_devices("cuda", 2, 4) == ["cuda:2"]  # an explicit GPU: every job on it
    assert runs.job_devices("cuda", None, 1) == ["cuda:0"]
    assert runs.job_devices("cpu", None, 0) == ["cpu"]
    assert runs.threads_per_job(None, 2, 2) == 1 and runs.threads_per_job(8, 3, 2) == 2
    assert runs.threads_per_job(1, 4, 16) == 1


# ---------------------------------------------------------------- fail fast, speak plainly

@pytest.fixture
def no_training(monkeypatch):
    """Any run that starts training fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a run started training before the options were checked")
    monkeypatch.setattr(runs, "train_run", refuse)
    monkeypatch.setattr(runs, "run_parallel", refuse)


def _fails(capsys, main, argv, *expected):
    """`main(argv)` exits 2 with a message of at most two lines naming `expected`, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def test_bad_layer_fails_before_training(capsys, no_training, tmp_path):
    err = _fails(capsys, depth_ablation.main, TINY + ["--layers", "9", "--out", str(tmp_path)], "--layers 9",
                 "out of range", "valid indices are 0 (input) to 4")
    assert "error:" in err and not (tmp_path / "results.jsonl").exists()
    _fails(capsys, feature_cutmix.main, TINY + ["--feature-layers", "1", "7", "--out", str(tmp_path)],
           "--feature-layers 1 7", "out of range")


def test_bad_alpha_fails_before_training(capsys, no_training, tmp_path):
    _fails(capsys, alpha_sweep.main, TINY + ["--alphas", "1", "0", "--out", str(tmp_path)], "--alphas 0",
           "alpha must be a number > 0", "got 0.0")
    _fails(capsys, depth_ablation.main, TINY + ["--cutmix-prob", "1.5", "--out", str(tmp_path)],
           "--cutmix-prob 1.5", "prob")
    _fails(capsys, depth_ablation.main, TINY + ["--label-smoothing", "1", "--out", str(tmp_path)],
           "--label-smoothing", "[0, 1)")


def test_unknown_model_fails_before_training(capsys, no_training, tmp_path):
    _fails(capsys, depth_ablation.main, TINY + ["--model", "not_a_model", "--out", str(tmp_path)],
           "--model", "'not_a_model' is not a model in timm's registry")
    err = _fails(capsys, depth_ablation.main, TINY + ["--model", "resnet20_cifr", "--out", str(tmp_path)], "--model")
    assert "did you mean" in err and "resnet20_cifar" in err
    _fails(capsys, depth_ablation.main, TINY[:5] + ["width=four", "depth=3"] + TINY[6:] + ["--out", str(tmp_path)],
           "--model-kwargs", "timm.create_model failed")


def test_missing_dataset_fails_without_downloading(capsys, no_training, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./data holds nothing
    argv = TINY[2:] + ["--dataset", "cifar10", "--out", str(tmp_path / "out")]
    _fails(capsys, depth_ablation.main, argv, "--dataset cifar10: not found", "--data-dir", "--download")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())  # nothing fetched
    (tmp_path / "empty").mkdir()
    _fails(capsys, depth_ablation.main, argv + ["--data-dir", str(tmp_path / "empty")], "in --data-dir")
    _fails(capsys, depth_ablation.main, argv + ["--data-dir", str(tmp_path / "nowhere")],
           "--data-dir", "is not a directory")
    _fails(capsys, depth_ablation.main, TINY + ["--dataset", "cifar1000"], "--dataset: expected one of")
    _fails(capsys, depth_ablation.main, TINY + ["--dataset", f"imagefolder:{tmp_path / 'nowhere'}"],
           "is not a directory")


def test_bad_choices_and_numbers_fail_in_two_lines(capsys, no_training, tmp_path):
    err = _fails(capsys, variants.main, TINY + ["--variants", "cutmix", "diagonal"], "--variants",
                 "invalid choice: 'diagonal'")
    assert err.startswith("usage: python -m experiments.variants [options] (see --help)")
    _fails(capsys, depth_ablation.main, TINY + ["--epochs", "0"], "--epochs: expected an integer >= 1, got 0")
    _fails(capsys, depth_ablation.main, TINY + ["--seeds", "1", "1"], "--seeds: expected distinct seeds")
    _fails(capsys, depth_ablation.main, TINY + ["--max-minutes", "-5"], "--max-minutes")
    _fails(capsys, depth_ablation.main, TINY + ["--device", "cuda:9"] if not torch.cuda.is_available()
           else TINY + ["--device", "tpu"], "--device")


def test_jobs_refused_under_torchrun(capsys, no_training, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    _fails(capsys, depth_ablation.main, TINY + ["--jobs", "2"], "--jobs 2: not under torchrun", "WORLD_SIZE=2")


def test_debug_shows_the_traceback(no_training):
    with pytest.raises(UsageError, match="out of range"):
        depth_ablation.main(TINY + ["--layers", "9", "--debug"])


# ---------------------------------------------------------------- help and results files

def _parser(mod) -> argparse.ArgumentParser:
    options_type = next((v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, options.StudyOptions)
                         and v.__module__ == mod.__name__), options.StudyOptions)
    return options.study_parser(mod.__name__.split(".")[-1], mod.__doc__, options_type)


@pytest.mark.parametrize("mod", STUDIES, ids=lambda m: m.__name__.split(".")[-1])
def test_help_shows_every_default_once(mod):
    p = _parser(mod)
    fmt = HelpFormatter(p.prog)
    for action in p._actions:
        if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            continue
        text = fmt._expand_help(action)
        flag = action.option_strings[0]
        assert text.count("default") <= 1, (flag, text)
        if action.default is None:  # recipe-filled options show each recipe's value
            assert "default" in text or "fast:" in text or flag.startswith("--no-") or action.const is not None \
                or flag in ("--threads", "--out", "--data-dir", "--max-minutes"), (flag, text)
        elif action.default is not False and action.default != []:
            assert "default" in text, (flag, text)
    help_text = p.format_help()
    assert "--layer" not in [a.option_strings[0] for a in p._actions] or "(default: 0)" in help_text
    assert "smoothing of the one-hot labels (before mixing) (default: 0.0)" in " ".join(help_text.split())


OUTPUT_FILES = {"report.json", "comparison.md", "comparison.csv", "comparison_by_setting.csv", "inbetween.png",
                "occlusion.png", "report.md", "table3.md", "throughput.json", "throughput.md", "summary.md"}


def test_help_cites_only_files_that_exist(capsys):
    from experiments.evaluation import command
    texts = [_parser(m).format_help() for m in STUDIES]
    for main in (command.main, throughput.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        texts.append(capsys.readouterr().out)
    for name in re.findall(r"[\w./<>-]+\.(?:md|py|json|csv|sh|png|txt)\b", " ".join(texts)):
        assert Path(name).name in OUTPUT_FILES or (ROOT / name).exists(), name


def test_round_row_keeps_what_was_measured():
    assert results.exact_decimals(500) == 1 and results.exact_decimals(10000) == 2
    assert results.exact_decimals(64) == 4 and results.exact_decimals(3) is None
    row = {"final_top1_err": 35.199999999999996, "best_top5_err": 100 * (1 - 497 / 500), "test_size": 500,
           "train_size": 1000, "final_train_loss": 0.123456789123, "train_time_s": 12.3456789,
           "images_per_s": 812.3456, "lr": 0.2, "seed": 3, "history": [{"train_acc": 100 * 333 / 1000}]}
    r = results.round_row(row)
    assert (r["final_top1_err"], r["best_top5_err"]) == (35.2, 0.6)
    assert (r["final_train_loss"], r["train_time_s"], r["images_per_s"]) == (0.1234568, 12.346, 812.3)
    assert r["history"][0]["train_acc"] == 33.3 and r["lr"] == 0.2 and r["seed"] == 3
    assert results.round_row({"final_top1_err": 100 / 3, "test_size": 3})["final_top1_err"] == 33.33333333
    for k in range(65):  # every error of a 64-image test set survives exactly
        assert results.round_percent(100 * (1 - k / 64), 64) * 64 / 100 == 64 - k


def test_results_csv_holds_no_float_noise(tmp_path):
    """results.csv is rounded to what was measured; results.jsonl keeps the values as computed (the summary's
    means come from them, so a tie at the second decimal prints as it always did)."""
    depth_ablation.main(TINY + ["--layers", "0", "--epochs", "2", "--out", str(tmp_path)])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert "compile_time_s" in rows[0] and "compiled_graphs" in rows[0] and rows[0]["threads"] == "1"
    for r in rows:
        for key in ("final_top1_err", "best_top1_err", "final_top5_err", "best_top5_err"):
            k = float(r[key]) * 64 / 100
            assert k == round(k) and len(r[key].split(".")[-1]) <= 4, (key, r[key])
        for key in ("final_train_loss", "train_time_s", "images_per_s"):
            assert not re.search(r"\d\.\d*(00000|99999)\d", r[key]) and len(r[key]) <= 12, (key, r[key])
    exact = results.load_rows(tmp_path)
    ckpt = torch.load(tmp_path / "ckpt" / "layer0_seed0.pt", weights_only=False)["metrics"]
    assert exact[1]["final_train_loss"] == ckpt["final_train_loss"]  # as computed
    assert float(rows[1]["final_train_loss"]) == float(f"{ckpt['final_train_loss']:.7g}")


def test_csv_keeps_an_older_header(tmp_path):
    """Rows appended to a results.csv written before new columns existed follow that file's header."""
    (tmp_path / "results.csv").write_text("study,setting,seed\n")
    results.append_row(tmp_path, {"study": "s", "setting": "a", "seed": 0, "compile_time_s": 1.0})
    assert (tmp_path / "results.csv").read_text().splitlines() == ["study,setting,seed", "s,a,0"]


def _python_without_omp_policy(code: str) -> str:
    """Run `python -c code` from the repository root with OMP_WAIT_POLICY unset; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_importing_the_experiments_changes_no_environment():
    _python_without_omp_policy(
        "import os; before = dict(os.environ); import experiments, experiments.study, experiments.depth_ablation, "
        "experiments.alpha_sweep, experiments.variants, experiments.feature_cutmix, experiments.throughput, "
        "experiments.evaluation.command; assert dict(os.environ) == before, set(os.environ) ^ set(before)")


@pytest.mark.parametrize("module,policy", [("experiments.depth_ablation", "PASSIVE"),
                                           ("experiments.evaluation", "PASSIVE"),
                                           ("experiments.bench.mixing", None)])
def test_commands_wait_passively_before_torch_loads(module, policy):
    """Run as `python -m` (runpy with alter_sys, as -m does): the study and evaluation commands set
    OMP_WAIT_POLICY=PASSIVE before torch is imported; a benchmark keeps OpenMP's default."""
    code = ("import os, runpy, sys, builtins\n"
            "seen = {}\n"
            "real = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name == 'torch' and 'torch' not in seen: seen['torch'] = os.environ.get('OMP_WAIT_POLICY')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\n"
            "sys.argv = ['x', '--help']\n"
            f"try: runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
            "except SystemExit: pass\n"
            "print(repr(seen.get('torch', 'not imported')))")
    assert _python_without_omp_policy(code).splitlines()[-1] == repr(policy)


def test_throughput_measures_the_three_configurations_of_one_study():
    args = throughput.parse(["--device", "cuda", "--data-dir", "d", "--jobs", "3"])
    argv = throughput.study_args(args, Path("o"))
    assert argv[argv.index("--model") + 1] == "resnet20_cifar" and argv[argv.index("--layers") + 1] == "0"
    assert argv[argv.index("--train-subset") + 1] == "5120" and int("5120") % 128 == 0  # one training batch shape
    assert "--data-dir" in argv and argv[argv.index("--seeds") + 1:argv.index("--seeds") + 3] == ["0", "1"]
    smoke = throughput.study_args(throughput.parse(["--smoke"]), Path("o"))
    assert smoke[smoke.index("--dataset") + 1] == "synthetic"


@pytest.mark.slow
def test_throughput_smoke_writes_its_table(tmp_path):
    out = throughput.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])
    table = (out / "throughput.md").read_text()
    assert "| eager |" in table and "| compiled |" in table and "| compiled + --jobs 2 |" in table
