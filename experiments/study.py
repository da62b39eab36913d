"""What the four studies share: the command-line options, recipes, and running settings x seeds with resume.

A study is a list of `Setting`s (the baseline first) run for every seed, seed-major, so that an
interrupted study already holds complete baseline/CutMix pairs. Every option and setting is checked before
the first run trains (`experiments.validate`). Each finished run leaves a checkpoint and a row; a rerun of
the same command skips those runs and resumes a run cut short from its last epoch (`experiments.checkpoint`;
`--max-minutes` stops at an epoch boundary on purpose). `--jobs N` trains N runs at once in separate
processes (`experiments.parallel`); under `torchrun` the same command trains with DistributedDataParallel
and only rank 0 writes. On CUDA the fast path is on by default (`experiments.fast`).

Exit status: 0 done, 2 a usage error (one message on stderr; `--debug` shows the traceback), 3 stopped by
`--max-minutes` (run the same command again to continue; 0 under torchrun, which reports any other status
as a failed worker).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from . import results
from .checkpoint import Deadline, RunKeeper, agree, save_atomic
from .cli import ArgumentParser, HelpFormatter, UsageError, add_device_options, model_kwarg, resolve_device, set_threads
from .data import DATASETS, load_dataset
from .engine import DistInfo, RunConfig, Setting, train_run
from .fast import COMPILE_BACKENDS, COMPILE_MODES, fast_defaults
from .validate import check_options, check_settings

# fast: the CPU regime where CutMix has something to regularise (on data the network cannot overfit,
# short schedules are only hurt by it): a fixed 1,000-image class-balanced Fashion-MNIST subset trained
# for 40 epochs and evaluated once at the end, sized so the default depth ablation (12 runs) fits the
# README's CPU budget (its measured time is there). paper-cifar: the paper's run.
RECIPES: dict[str, dict[str, Any]] = {
    "fast": dict(model="resnet8_cifar", dataset="fashion-mnist", train_subset=1000, test_subset=0, epochs=40,
                 batch_size=128, lr=0.2, wd=5e-4, schedule="onecycle", cutmix_prob=0.5, alpha=1.0,
                 seeds=[0, 1], eval_every=40),
    "paper-cifar": dict(model="pyramidnet200_a240", dataset="cifar100", train_subset=0, test_subset=0, epochs=300,
                        batch_size=64, lr=0.25, wd=1e-4, schedule="step", cutmix_prob=0.5, alpha=1.0,
                        seeds=[0, 1, 2], eval_every=1),
}
SMOKE = dict(epochs=1, train_subset=256, test_subset=500, seeds=[0], eval_every=1)
SUBSET_SEED = 1234  # fixed: every seed and setting trains on the same subset
# Options that do not change what is measured (only how fast) and so may differ on resume.
_SPEED_ONLY = {"eval_batch_size", "channels_last", "compile", "compile_mode", "compile_backend"}


def _recipe(key: str, text: str) -> str:
    """Help text of a recipe-filled option, with each recipe's value."""
    values = "; ".join(f"{r}: {v[key] if v[key] != 0 or 'subset' not in key else 'all'}" for r, v in RECIPES.items())
    return f"{text} ({values})"


def build_parser(study: str, description: str) -> argparse.ArgumentParser:
    """The options every study takes; a study adds its own (layers, alphas, ...) before parsing."""
    p = ArgumentParser(prog=f"python -m experiments.{study}", description=description, formatter_class=HelpFormatter)
    r = p.add_argument_group("recipe (options left unset take the recipe's value)")
    r.add_argument("--recipe", choices=sorted(RECIPES), default="fast",
                   help="fast: ResNet-8 on a 1k-image Fashion-MNIST subset, minutes on a CPU; paper-cifar: "
                        "PyramidNet-200 (a240) on CIFAR-100, 300 epochs, the paper's schedule")
    r.add_argument("--smoke", action="store_true",
                   help=f"tiny run for CI (<1 min): {SMOKE}, output in runs/<study>-smoke")
    m = p.add_argument_group("model and data")
    m.add_argument("--model", help=_recipe("model", "any timm model name (featmix's models: resnet8_cifar, "
                                                    "resnet20_cifar, pyramidnet200_a240, ...)"))
    m.add_argument("--model-kwargs", nargs="+", type=model_kwarg, default=[], metavar="KEY=VALUE",
                   help="extra keyword arguments for timm.create_model, e.g. width=32 drop_rate=0.1")
    m.add_argument("--dataset",
                   help=_recipe("dataset", f"one of {', '.join(DATASETS)} (synthetic: tiny data for tests)"))
    m.add_argument("--data-dir", default=os.environ.get("FEATMIX_DATA"),
                   help="where datasets live or are downloaded to (Fashion-MNIST is also looked up in "
                        "/usr/share/datasets/fashion-mnist; default for downloads: ./data; env FEATMIX_DATA)")
    m.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    m.add_argument("--train-subset", type=int, metavar="N",
                   help=_recipe("train_subset", "train on a fixed class-balanced subset of N images (0: all)"))
    m.add_argument("--test-subset", type=int, metavar="N",
                   help=_recipe("test_subset", "evaluate on a fixed class-balanced subset of N test images (0: all)"))
    m.add_argument("--image-size", type=int, default=224, help="crop size for imagefolder datasets")
    m.add_argument("--workers", type=int, default=4, help="DataLoader workers for imagefolder datasets")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, help=_recipe("epochs", "training epochs"))
    t.add_argument("--batch-size", type=int, help=_recipe("batch_size", "global batch size (split over DDP ranks)"))
    t.add_argument("--eval-batch-size", type=int, default=500, help="test batch size")
    t.add_argument("--lr", type=float, help=_recipe("lr", "peak learning rate (SGD, nesterov momentum)"))
    t.add_argument("--wd", type=float, help=_recipe("wd", "weight decay"))
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (nesterov when > 0)")
    t.add_argument("--schedule", choices=["onecycle", "step", "cosine"],
                   help=_recipe("schedule", "lr schedule; step = /10 at 50%% and 75%% of the epochs"))
    t.add_argument("--cutmix-prob", type=float, help=_recipe("cutmix_prob", "probability that a batch is mixed"))
    t.add_argument("--alpha", type=float,
                   help=_recipe("alpha", "lam ~ Beta(alpha, alpha) (for settings that do not vary it)"))
    t.add_argument("--label-smoothing", type=float, default=0.0,
                   help="smoothing of the one-hot labels (before mixing)")
    t.add_argument("--seeds", type=int, nargs="+",
                   help=_recipe("seeds", "seed k is shared by every setting (paired comparison)"))
    t.add_argument("--eval-every", type=int, metavar="E",
                   help=_recipe("eval_every", "evaluate every E epochs (and after the last)"))
    _add_speed_options(p)
    o = p.add_argument_group("output and long runs")
    o.add_argument("--out", help="output directory (default runs/<study>, or runs/<study>-smoke)")
    o.add_argument("--max-minutes", type=float, metavar="M",
                   help="stop at the first epoch boundary where the next epoch would end past M minutes, state "
                        "saved (exit status 3); the same command resumes (default: no limit)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars (also off when not a TTY)")
    o.add_argument("--debug", action="store_true", help="show the traceback behind an error message")
    return p


def _switch(group: Any, name: str, text: str) -> None:
    """--NAME / --no-NAME sharing one destination, unset (None) unless given: the device decides."""
    dest = name.replace("-", "_")
    group.add_argument(f"--{name}", dest=dest, action="store_true", default=None,
                       help=f"{text} (default: on with CUDA, off on a CPU)")
    group.add_argument(f"--no-{name}", dest=dest, action="store_false", default=None, help=f"turn --{name} off")


def _add_speed_options(p: argparse.ArgumentParser) -> None:
    """Device, threads, the CUDA fast path (each switch with its opt-out) and --jobs."""
    s = p.add_argument_group("hardware and speed")
    add_device_options(s)
    _switch(s, "amp", "autocast to bf16 (fp16 + grad scaling on GPUs without bf16)")
    _switch(s, "channels-last", "channels_last memory format")
    _switch(s, "compile", "torch.compile the model, once per model structure and batch shape")
    s.add_argument("--compile-mode", choices=COMPILE_MODES, default="auto",
                   help="torch.compile mode; auto is reduce-overhead (CUDA graphs) on one CUDA device, inductor's "
                        "plain mode under torchrun or on a CPU")
    s.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default="inductor",
                   help="torch.compile backend (aot_eager or eager: check the graphs without inductor)")
    s.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N (setting, seed) runs at once, each in its own process: all on one GPU, one per GPU "
                        "round-robin when several are visible, or splitting the CPU threads; same numbers as one by "
                        "one (not under torchrun)")


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Recipe defaults <- --smoke <- explicit options; returns a flat dict of every option."""
    opts = dict(RECIPES[args.recipe])
    if args.smoke:
        opts.update(SMOKE)
    opts.update({k: v for k, v in vars(args).items() if v is not None and k not in ("recipe", "smoke")})
    opts["recipe"], opts["smoke"] = args.recipe, args.smoke
    opts["model_kwargs"] = dict(args.model_kwargs)
    return opts


def run_config(opts: dict[str, Any]) -> RunConfig:
    """The RunConfig fields of the resolved options."""
    return RunConfig(**{f.name: opts[f.name] for f in fields(RunConfig) if f.name in opts})


def measured_options(study: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The options that define the measurements (not seeds, the settings list, output or speed switches)."""
    keys = [f.name for f in fields(RunConfig) if f.name not in _SPEED_ONLY]
    keys += ["train_subset", "test_subset", "image_size"]
    return {"study": study, "subset_seed": SUBSET_SEED, **{k: opts.get(k) for k in keys}}


def config_hash(study: str, opts: dict[str, Any]) -> str:
    """Fingerprint of `measured_options`: rows and checkpoints of another configuration are never reused."""
    blob = json.dumps(measured_options(study, opts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def device_of(name: str) -> torch.device:
    """--device -> torch.device, a bad or absent device as a UsageError."""
    try:
        return resolve_device(name)
    except SystemExit as e:
        raise UsageError(str(e.code)) from None


def setup_cuda(dev: torch.device) -> torch.device:
    """Make `dev` (cuda, cuda:N) this process's device, with cudnn autotuning and TF32 matmuls; returns cuda:N."""
    dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    torch.cuda.set_device(dev)
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    return dev


def init_distributed(device: str) -> DistInfo:
    """--device -> this process's DistInfo; DDP under torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    dev = device_of(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = setup_cuda(torch.device("cuda", local) if world > 1 else dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, dev)


def apply_fast_defaults(opts: dict[str, Any], device_type: str, world_size: int) -> None:
    """Fill amp / channels_last / compile / compile_mode in `opts` for the device (see `experiments.fast`)."""
    speed = fast_defaults(device_type, opts.get("amp"), opts.get("channels_last"), opts.get("compile"),
                          opts.get("compile_mode", "auto"), opts.get("compile_backend", "inductor"), world_size)
    opts.update(amp=speed.amp, channels_last=speed.channels_last, compile=speed.compile,
                compile_mode=speed.compile_mode, compile_backend=speed.compile_backend)


def _finished(out: Path, chash: str) -> set[tuple[str, int]]:
    """Runs with a row of this configuration and a checkpoint on disk."""
    return {(r["setting"], r["seed"]) for r in results.load_rows(out)
            if r.get("config_hash") == chash and (out / "ckpt" / f"{r['setting']}_seed{r['seed']}.pt").exists()}


def _check_out_dir(out: Path, study: str, chash: str, opts: dict[str, Any]) -> None:
    """Refuse to mix two configurations in one output directory (resume needs like with like)."""
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        return
    old = json.loads(cfg_path.read_text())
    if old.get("config_hash") != chash:
        new = json.loads(json.dumps(measured_options(study, opts), default=str))
        was = old.get("measured", {})
        diff = {k: (was.get(k), v) for k, v in new.items() if was.get(k) != v}
        raise UsageError(f"--out {out} holds results of a different configuration (old -> new: {diff}); "
                         "pass another --out or delete that directory")


@dataclass
class StudyRun:
    """One invocation of a study: its options, settings, data, output directory and where this process sits."""

    study: str
    opts: dict[str, Any]
    settings: list[Setting]
    cfg: RunConfig
    di: DistInfo
    data: Any
    out: Path
    chash: str

    @property
    def seeds(self) -> list[int]:
        """The seeds every setting runs with."""
        return self.opts["seeds"]


def load_study_data(opts: dict[str, Any], device: torch.device) -> Any:
    """The dataset of `opts` with its fixed train/test subsets, on `device`; missing data is a UsageError."""
    try:
        data = load_dataset(opts["dataset"], opts.get("data_dir"), opts["download"], opts["image_size"],
                            opts["workers"])
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from e
    for flag, n, keep, seed in (("--train-subset", opts["train_subset"], data.subset, SUBSET_SEED),
                                ("--test-subset", opts["test_subset"], data.test_subset, SUBSET_SEED + 1)):
        try:
            keep(n or None, torch.Generator().manual_seed(seed))
        except ValueError as e:
            raise UsageError(f"{flag} {n}: {e}") from e
    return data.to(device)


def prepare(study: str, args: argparse.Namespace, make_settings: Callable[[dict[str, Any]], Sequence[Setting]],
            flags: dict[str, str] | None = None) -> StudyRun:
    """Resolve and check the options, join DDP, check the output directory, load the (subset) data, check every
    setting against the model: everything that can fail does so here, before any run trains."""
    opts = resolve(args)
    check_options(opts)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if opts["jobs"] > 1 and world > 1:
        raise UsageError(f"--jobs {opts['jobs']}: not under torchrun (WORLD_SIZE={world}): DDP already spreads one "
                         "run over the processes; use --jobs without torchrun, or torchrun without --jobs")
    set_threads(opts.get("threads"))
    di = init_distributed(opts["device"]) if opts["jobs"] == 1 else DistInfo(0, 1, device_of(opts["device"]))
    apply_fast_defaults(opts, di.device.type, di.world_size)
    if opts["batch_size"] % di.world_size:
        raise UsageError(f"--batch-size {opts['batch_size']}: must be divisible by the {di.world_size} processes")
    out = Path(opts.get("out") or f"runs/{study}{'-smoke' if opts['smoke'] else ''}")
    chash = config_hash(study, opts)
    _check_out_dir(out, study, chash, opts)  # on every rank, so that all of them stop
    data = load_study_data(opts, di.device if opts["jobs"] == 1 else torch.device("cpu"))
    settings = list(make_settings(opts))
    check_settings(opts, settings, data.num_classes, data.in_chans, flags)
    return StudyRun(study, opts, settings, run_config(opts), di, data, out, chash)


def runs_to_do(run: StudyRun) -> list[tuple[int, Setting]]:
    """(seed, setting) not finished yet, seed-major; rank 0 writes config.json and tells the other ranks."""
    done: list[Any] = [None]
    if run.di.is_main:
        (run.out / "ckpt").mkdir(parents=True, exist_ok=True)
        config = {"study": run.study, "config_hash": run.chash, "measured": measured_options(run.study, run.opts),
                  "options": run.opts, "settings": [asdict(s) for s in run.settings],
                  "train_size": run.data.num_train, "test_size": run.data.num_test, "world_size": run.di.world_size,
                  "device": str(run.di.device), "torch": torch.__version__, "argv": sys.argv}
        (run.out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        done[0] = _finished(run.out, run.chash)
    if run.di.world_size > 1:
        dist.broadcast_object_list(done, src=0)
    return [(seed, s) for seed in run.seeds for s in run.settings if (s.name, seed) not in done[0]]


def resume_path(out: Path, setting: Setting, seed: int) -> Path:
    """Where a run's state waits between epochs (outside ckpt/, which holds finished runs only)."""
    return out / "resume" / f"{setting.name}_seed{seed}.pt"


def save_checkpoint(run: StudyRun, setting: Setting, seed: int, metrics: dict[str, Any], state: dict[str, Any]) -> Path:
    """The finished run's checkpoint, written whole then renamed (its row follows, written by `append_result`)."""
    cfg, data, opts = run.cfg, run.data, run.opts
    ckpt = {"model_state": state, "model": cfg.model, "model_kwargs": cfg.model_kwargs,
            "num_classes": data.num_classes, "in_chans": data.in_chans, "input_size": data.input_size,
            "dataset": opts["dataset"], "mean": data.mean, "std": data.std, "setting": asdict(setting), "seed": seed,
            "config": opts, "config_hash": run.chash, "metrics": metrics}
    path = run.out / "ckpt" / f"{setting.name}_seed{seed}.pt"
    save_atomic(ckpt, path)
    return path


def append_result(run: StudyRun, setting: Setting, seed: int, metrics: dict[str, Any], device: str,
                  threads: int) -> None:
    """The run's row in results.jsonl/csv (after its checkpoint: a row always has its checkpoint); `device` and
    `threads` are those the run trained with (on a CPU the numbers depend on the thread count)."""
    cfg, data, opts = run.cfg, run.data, run.opts
    mixes = setting.mixes
    row = {"study": run.study, "model": cfg.model, "dataset": opts["dataset"], "setting": setting.name,
           "layer": setting.layer, "alpha": setting.alpha if mixes else None,
           "variant": setting.variant if mixes else None, "kind": setting.kind if mixes else None,
           "cutmix_prob": cfg.cutmix_prob if mixes else None,
           "seed": seed, "epochs": cfg.epochs, "train_size": data.num_train, "test_size": data.num_test,
           "batch_size": cfg.batch_size, "lr": cfg.lr, **{k: v for k, v in metrics.items() if k != "history"},
           "world_size": run.di.world_size, "device": device, "threads": threads, "config_hash": run.chash,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    results.append_row(run.out, row)


def save_run(run: StudyRun, setting: Setting, seed: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """The checkpoint, then its row."""
    save_checkpoint(run, setting, seed, metrics, state)
    append_result(run, setting, seed, metrics, str(run.di.device), torch.get_num_threads())


def summarise(run: StudyRun, plot: Callable[[list[dict], Path, str], Path | None] | None) -> None:
    """Write summary.md (and the plot) from this configuration's rows; print the table and the paths."""
    cfg, opts, data = run.cfg, run.opts, run.data
    names = [s.name for s in run.settings]
    rows = [r for r in results.load_rows(run.out) if r.get("config_hash") == run.chash
            and r["setting"] in names and r["seed"] in run.seeds]
    if not rows:
        return
    stats = results.summarize(rows, names)
    header = (f"# {run.study}\n\n{opts['model']} on {opts['dataset']} ({data.num_train} training images, "
              f"{data.num_test} test images), {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr} "
              f"({cfg.schedule}), wd {cfg.wd}, cutmix_prob {cfg.cutmix_prob}, seeds {run.seeds}, "
              f"recipe {opts['recipe']}{' (smoke)' if opts['smoke'] else ''}; config {run.chash}.")
    summary = results.write_summary(run.out, stats, header)
    print("\n" + results.markdown_table(stats) + f"\n\nsummary: {summary}")
    fig = plot(stats, run.out, run.study) if plot is not None else None
    if fig is not None:
        print(f"plot: {fig}")


def report_run(i: int, n: int, setting: Setting, seed: int, metrics: dict[str, Any], t_start: float) -> None:
    """One line per finished run: errors, times (compilation apart), throughput, time since the study began."""
    compiled = f" + compile {metrics['compile_time_s']:.0f} s" if metrics.get("compiled_graphs") else ""
    print(f"[{i}/{n}] {setting.name} seed {seed}: final top-1 err {metrics['final_top1_err']:.2f}% "
          f"(best {metrics['best_top1_err']:.2f}%), top-5 {metrics['final_top5_err']:.2f}%, "
          f"{metrics['train_time_s']:.0f}+{metrics['eval_time_s']:.0f} s{compiled}, "
          f"{metrics['images_per_s']:.0f} img/s, {time.perf_counter() - t_start:.0f} s elapsed", flush=True)


def run_sequential(run: StudyRun, todo: list[tuple[int, Setting]], deadline: Deadline, progress: bool) -> bool:
    """Train the runs one after the other in this process (every rank under DDP); True if the deadline stopped it."""
    t_start = time.perf_counter()
    say = print if run.di.is_main else (lambda *a, **k: None)
    for i, (seed, s) in enumerate(todo, 1):
        if agree(deadline.next_epoch_passes(), run.di):
            return True
        keeper = RunKeeper(resume_path(run.out, s, seed), run.chash, s, seed, deadline, say)
        metrics, state = train_run(run.cfg, s, seed, run.data, run.di, progress, desc=f"{s.name} seed{seed}",
                                   keeper=keeper)
        if metrics is None:
            return True
        if run.di.is_main:
            save_run(run, s, seed, metrics, state)
            keeper.discard()
            report_run(i, len(todo), s, seed, metrics, t_start)
    return False


class StudyStopped(Exception):
    """The deadline of --max-minutes stopped the study at an epoch boundary; the same command resumes it."""


def run_study(study: str, args: argparse.Namespace, make_settings: Callable[[dict[str, Any]], Sequence[Setting]],
              plot: Callable[[list[dict], Path, str], Path | None] | None = None,
              flags: dict[str, str] | None = None) -> Path:
    """Run every setting x seed not yet finished, then write summary.md and the plot; returns the out dir.
    Raises StudyStopped (after the summary of the finished runs) when --max-minutes stopped it."""
    deadline = Deadline.after_minutes(args.max_minutes)
    run = prepare(study, args, make_settings, flags)
    todo = runs_to_do(run)
    progress = not run.opts["no_progress"] and sys.stderr.isatty()
    jobs = run.opts["jobs"]
    if run.di.is_main:
        speed = ", ".join(k for k in ("amp", "channels_last", "compile") if run.opts[k]) or "eager fp32"
        print(f"{study}: {len(run.settings)} settings x {len(run.seeds)} seeds on {run.opts['dataset']} "
              f"({run.data.num_train} train / {run.data.num_test} test images), {run.opts['model']}, "
              f"{run.cfg.epochs} epochs, device {run.di.device} x{run.di.world_size} ({speed}), {jobs} job(s); "
              f"{len(todo)} runs to do, {len(run.settings) * len(run.seeds) - len(todo)} already finished in "
              f"{run.out}", flush=True)
    if jobs > 1 and todo:  # even for one run: its threads are those of the N-way split, as for the others
        from .parallel import run_parallel
        stopped = run_parallel(run, todo, jobs, deadline)
    else:
        stopped = run_sequential(run, todo, deadline, progress)
    if run.di.is_main:
        summarise(run, plot)
    if run.di.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if stopped:
        raise StudyStopped(f"stopped by --max-minutes {args.max_minutes:g} at an epoch boundary, state saved in "
                           f"{run.out}; run the same command again to continue")
    return run.out


Option = tuple[str, dict[str, Any]]  # (flag, argparse.add_argument keyword arguments)


def main(study: str, description: str, argv: Sequence[str] | None, options: Sequence[Option],
         make_settings: Callable[[dict[str, Any]], Sequence[Setting]],
         plot: Callable[[list[dict], Path, str], Path | None] | None, flags: dict[str, str] | None = None) -> Path:
    """A study's command line: the shared options plus the study's own, parsed from `argv`, then `run_study`.

    A usage error prints one message on stderr and exits 2 (`--debug`: the traceback); a stop by --max-minutes
    exits 3. `flags` names the option each Setting field comes from (e.g. {"layer": "--layers"}) for messages.
    """
    p = build_parser(study, description)
    for flag, kwargs in options:
        p.add_argument(flag, **kwargs)
    args = p.parse_args(argv)
    try:
        return run_study(study, args, make_settings, plot, flags)
    except UsageError as e:
        if args.debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"{p.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except StudyStopped as e:
        ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun reports any other status as a failure
        if os.environ.get("RANK", "0") == "0":
            print(f"{study}: {e}{' (exit status 0 under torchrun)' if ddp else ''}", file=sys.stderr)
        raise SystemExit(0 if ddp else 3) from None
