"""Running a study: its settings x seeds, checked first, resumed where it stopped, summarised at the end.

The options and recipes live in `experiments.options`, the training of the runs (one by one or `--jobs N` at
once) in `experiments.runs`. A study is a list of `Setting`s (the baseline first) run for every seed,
seed-major, so that an interrupted study already holds complete baseline/CutMix pairs. Every option and
setting is checked before the first run trains (`experiments.validate`). Each finished run leaves a checkpoint
and a row; a rerun of the same command skips those runs and resumes a run cut short from its last epoch
(`experiments.checkpoint`; `--max-minutes` stops at an epoch boundary on purpose). `--jobs N` trains N runs at
once in separate processes; under `torchrun` the same command trains with DistributedDataParallel and only
rank 0 writes. On CUDA the fast path is on by default (`experiments.fast`).

Exit status: 0 done, 2 a usage error (one message on stderr; `--debug` shows the traceback), 3 stopped by
`--max-minutes` (run the same command again to continue; 0 under torchrun, which reports any other status
as a failed worker).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from . import results, runs
from .checkpoint import Deadline
from .cli import UsageError, resolve_device, set_threads
from .engine import DistInfo, Setting
from .fast import fast_defaults
from .options import StudyOptions, config_hash, measured_options, resolve, run_config, study_parser
from .runs import StudyRun, load_study_data, setup_cuda
from .validate import check_options, check_settings

SettingsMaker = Callable[[Any], Sequence[Setting]]  # the study's options -> its settings, the baseline first
Plotter = Callable[[list[dict], Path, str], "Path | None"]  # (summary rows, out dir, study name) -> the plot


def device_of(name: str) -> torch.device:
    """--device -> torch.device, a bad or absent device as a UsageError."""
    try:
        return resolve_device(name)
    except SystemExit as e:
        raise UsageError(str(e.code)) from None


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


def apply_fast_defaults(opts: StudyOptions, device_type: str, world_size: int) -> None:
    """Fill amp / channels_last / compile / compile_mode in `opts` for the device (see `experiments.fast`)."""
    speed = fast_defaults(device_type, opts.amp, opts.channels_last, opts.compile, opts.compile_mode,
                          opts.compile_backend, world_size)
    opts.amp, opts.channels_last, opts.compile = speed.amp, speed.channels_last, speed.compile
    opts.compile_mode, opts.compile_backend = speed.compile_mode, speed.compile_backend


def _finished(out: Path, fingerprint: str) -> set[tuple[str, int]]:
    """Runs with a row of this configuration and a checkpoint on disk."""
    return {(r["setting"], r["seed"]) for r in results.load_rows(out)
            if r.get("config_hash") == fingerprint and (out / "ckpt" / f"{r['setting']}_seed{r['seed']}.pt").exists()}


def _check_out_dir(out: Path, study: str, fingerprint: str, opts: StudyOptions) -> None:
    """Refuse to mix two configurations in one output directory (resume needs like with like)."""
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        return
    old = json.loads(cfg_path.read_text())
    if old.get("config_hash") != fingerprint:
        new = json.loads(json.dumps(measured_options(study, opts), default=str))
        was = old.get("measured", {})
        diff = {k: (was.get(k), v) for k, v in new.items() if was.get(k) != v}
        raise UsageError(f"--out {out} holds results of a different configuration (old -> new: {diff}); "
                         "pass another --out or delete that directory")


def prepare(study: str, opts: StudyOptions, make_settings: SettingsMaker, flags: dict[str, str] | None = None
            ) -> StudyRun:
    """Check the options, join DDP, check the output directory, load the (subset) data, check every setting
    against the model: everything that can fail does so here, before any run trains."""
    check_options(opts)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if opts.jobs > 1 and world > 1:
        raise UsageError(f"--jobs {opts.jobs}: not under torchrun (WORLD_SIZE={world}): DDP already spreads one "
                         "run over the processes; use --jobs without torchrun, or torchrun without --jobs")
    set_threads(opts.threads)
    dist_info = init_distributed(opts.device) if opts.jobs == 1 else DistInfo(0, 1, device_of(opts.device))
    apply_fast_defaults(opts, dist_info.device.type, dist_info.world_size)
    if opts.batch_size % dist_info.world_size:
        raise UsageError(f"--batch-size {opts.batch_size}: must be divisible by the {dist_info.world_size} processes")
    out = Path(opts.out or f"runs/{study}{'-smoke' if opts.smoke else ''}")
    fingerprint = config_hash(study, opts)
    _check_out_dir(out, study, fingerprint, opts)  # on every rank, so that all of them stop
    data = load_study_data(opts, dist_info.device if opts.jobs == 1 else torch.device("cpu"))
    settings = list(make_settings(opts))
    check_settings(opts, settings, data.num_classes, data.in_chans, flags)
    return StudyRun(study, opts, settings, run_config(opts), dist_info, data, out, fingerprint)


def runs_to_do(run: StudyRun) -> list[tuple[int, Setting]]:
    """(seed, setting) not finished yet, seed-major; rank 0 writes config.json and tells the other ranks."""
    done: list[Any] = [None]
    if run.dist_info.is_main:
        (run.out / "ckpt").mkdir(parents=True, exist_ok=True)
        config = {"study": run.study, "config_hash": run.config_hash,
                  "measured": measured_options(run.study, run.opts), "options": run.opts.as_dict(),
                  "settings": [asdict(s) for s in run.settings], "train_size": run.data.num_train,
                  "test_size": run.data.num_test, "world_size": run.dist_info.world_size,
                  "device": str(run.dist_info.device), "torch": torch.__version__, "argv": sys.argv}
        (run.out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        done[0] = _finished(run.out, run.config_hash)
    if run.dist_info.world_size > 1:
        dist.broadcast_object_list(done, src=0)
    return [(seed, s) for seed in run.seeds for s in run.settings if (s.name, seed) not in done[0]]


def summarise(run: StudyRun, plot: Plotter | None) -> None:
    """Write summary.md (and the plot) from this configuration's rows; print the table and the paths."""
    cfg, opts, data = run.cfg, run.opts, run.data
    names = [s.name for s in run.settings]
    rows = [r for r in results.load_rows(run.out) if r.get("config_hash") == run.config_hash
            and r["setting"] in names and r["seed"] in run.seeds]
    if not rows:
        return
    stats = results.summarize(rows, names)
    header = (f"# {run.study}\n\n{opts.model} on {opts.dataset} ({data.num_train} training images, "
              f"{data.num_test} test images), {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr} "
              f"({cfg.schedule}), wd {cfg.wd}, cutmix_prob {cfg.cutmix_prob}, seeds {run.seeds}, "
              f"recipe {opts.recipe}{' (smoke)' if opts.smoke else ''}; config {run.config_hash}.")
    summary = results.write_summary(run.out, stats, header)
    print("\n" + results.markdown_table(stats) + f"\n\nsummary: {summary}")
    fig = plot(stats, run.out, run.study) if plot is not None else None
    if fig is not None:
        print(f"plot: {fig}")


class StudyStopped(Exception):
    """The deadline of --max-minutes stopped the study at an epoch boundary; the same command resumes it."""


def run_study(study: str, opts: StudyOptions, make_settings: SettingsMaker, plot: Plotter | None = None,
              flags: dict[str, str] | None = None) -> Path:
    """Run every setting x seed not yet finished, then write summary.md and the plot; returns the out dir.
    Raises StudyStopped (after the summary of the finished runs) when --max-minutes stopped it."""
    deadline = Deadline.after_minutes(opts.max_minutes)
    run = prepare(study, opts, make_settings, flags)
    todo = runs_to_do(run)
    progress = not opts.no_progress and sys.stderr.isatty()
    jobs = opts.jobs
    if run.dist_info.is_main:
        speed = ", ".join(k for k in ("amp", "channels_last", "compile") if getattr(opts, k)) or "eager fp32"
        print(f"{study}: {len(run.settings)} settings x {len(run.seeds)} seeds on {opts.dataset} "
              f"({run.data.num_train} train / {run.data.num_test} test images), {opts.model}, "
              f"{run.cfg.epochs} epochs, device {run.dist_info.device} x{run.dist_info.world_size} ({speed}), "
              f"{jobs} job(s); "
              f"{len(todo)} runs to do, {len(run.settings) * len(run.seeds) - len(todo)} already finished in "
              f"{run.out}", flush=True)
    if jobs > 1 and todo:  # even for one run: its threads are those of the N-way split, as for the others
        stopped = runs.run_parallel(run, todo, jobs, deadline)
    else:
        stopped = runs.run_sequential(run, todo, deadline, progress)
    if run.dist_info.is_main:
        summarise(run, plot)
    if run.dist_info.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if stopped:
        raise StudyStopped(f"stopped by --max-minutes {opts.max_minutes:g} at an epoch boundary, state saved in "
                           f"{run.out}; run the same command again to continue")
    return run.out


def main(study: str, description: str, argv: Sequence[str] | None, make_settings: SettingsMaker,
         plot: Plotter | None, options_type: type[StudyOptions] = StudyOptions,
         flags: dict[str, str] | None = None) -> Path:
    """A study's command line: the shared options plus the study's own (the `study_option` fields of
    `options_type`), parsed from `argv` into an `options_type`, then `run_study`.

    A usage error prints one message on stderr and exits 2 (`--debug`: the traceback); a stop by --max-minutes
    exits 3. `flags` names the option each Setting field comes from (e.g. {"layer": "--layers"}) for messages.
    """
    p = study_parser(study, description, options_type)
    args = p.parse_args(argv)
    try:
        return run_study(study, resolve(args, options_type), make_settings, plot, flags)
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
