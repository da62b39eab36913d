"""Training a study's runs: one after the other in this process (every rank under DDP), or N at once.

`run_sequential` and `run_parallel` train the same (setting, seed) runs with the same `train_run`, save each
finished run's checkpoint, then its row (`save_checkpoint`, `append_result`), and print one line per run.

`--jobs N` (`run_parallel`): small models leave a GPU mostly idle, so several runs share it; with several GPUs
visible (and `--device` auto or cuda) job k uses GPU k mod count; on a CPU the threads are split between the
jobs (a CPU run's numbers depend on its thread count: `--jobs N --threads T` reproduces one-by-one runs with
`--threads T/N`). Each worker process loads the data once, then trains the runs it is handed (same seeds ->
same numbers: a run's randomness comes from its own seeded streams, never from what ran before it in the
process) and writes the run's checkpoint; the parent writes the rows. Workers start with `spawn` (CUDA cannot
be forked). Runs that need several GPUs use torchrun instead.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import results
from .checkpoint import Deadline, RunKeeper, agree, save_atomic
from .cli import UsageError
from .data import load_dataset
from .engine import DistInfo, RunConfig, Setting, train_run
from .options import SUBSET_SEED, StudyOptions, run_config


@dataclass
class StudyRun:
    """One invocation of a study: its options, settings, data, output directory and where this process sits."""

    study: str
    opts: StudyOptions
    settings: list[Setting]
    cfg: RunConfig
    dist_info: DistInfo
    data: Any
    out: Path
    config_hash: str

    @property
    def seeds(self) -> list[int]:
        """The seeds every setting runs with."""
        return self.opts.seeds


def load_study_data(opts: StudyOptions, device: torch.device) -> Any:
    """The dataset of `opts` with its fixed train/test subsets, on `device`; missing data is a UsageError."""
    try:
        data = load_dataset(opts.dataset, opts.data_dir, opts.download, opts.image_size, opts.workers)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from e
    for flag, n, keep, seed in (("--train-subset", opts.train_subset, data.subset, SUBSET_SEED),
                                ("--test-subset", opts.test_subset, data.test_subset, SUBSET_SEED + 1)):
        try:
            keep(n or None, torch.Generator().manual_seed(seed))
        except ValueError as e:
            raise UsageError(f"{flag} {n}: {e}") from e
    return data.to(device)

def setup_cuda(dev: torch.device) -> torch.device:
    """Make `dev` (cuda, cuda:N) this process's device, with cudnn autotuning and TF32 matmuls; returns cuda:N."""
    dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    torch.cuda.set_device(dev)
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    return dev

def resume_path(out: Path, setting: Setting, seed: int) -> Path:
    """Where a run's state waits between epochs (outside ckpt/, which holds finished runs only)."""
    return out / "resume" / f"{setting.name}_seed{seed}.pt"


def save_checkpoint(run: StudyRun, setting: Setting, seed: int, metrics: dict[str, Any], state: dict[str, Any]) -> Path:
    """The finished run's checkpoint, written whole then renamed (its row follows, written by `append_result`)."""
    cfg, data, opts = run.cfg, run.data, run.opts
    ckpt = {"model_state": state, "model": cfg.model, "model_kwargs": cfg.model_kwargs,
            "num_classes": data.num_classes, "in_chans": data.in_chans, "input_size": data.input_size,
            "dataset": opts.dataset, "mean": data.mean, "std": data.std, "setting": asdict(setting), "seed": seed,
            "config": opts.as_dict(), "config_hash": run.config_hash, "metrics": metrics}
    path = run.out / "ckpt" / f"{setting.name}_seed{seed}.pt"
    save_atomic(ckpt, path)
    return path


def append_result(run: StudyRun, setting: Setting, seed: int, metrics: dict[str, Any], device: str,
                  threads: int) -> None:
    """The run's row in results.jsonl/csv (after its checkpoint: a row always has its checkpoint); `device` and
    `threads` are those the run trained with (on a CPU the numbers depend on the thread count)."""
    cfg, data, opts = run.cfg, run.data, run.opts
    mixes = setting.mixes
    row = {"study": run.study, "model": cfg.model, "dataset": opts.dataset, "setting": setting.name,
           "layer": setting.layer, "alpha": setting.alpha if mixes else None,
           "variant": setting.variant if mixes else None, "kind": setting.kind if mixes else None,
           "cutmix_prob": cfg.cutmix_prob if mixes else None,
           "seed": seed, "epochs": cfg.epochs, "train_size": data.num_train, "test_size": data.num_test,
           "batch_size": cfg.batch_size, "lr": cfg.lr, **{k: v for k, v in metrics.items() if k != "history"},
           "world_size": run.dist_info.world_size, "device": device, "threads": threads, "config_hash": run.config_hash,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    results.append_row(run.out, row)


def save_run(run: StudyRun, setting: Setting, seed: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """The checkpoint, then its row."""
    save_checkpoint(run, setting, seed, metrics, state)
    append_result(run, setting, seed, metrics, str(run.dist_info.device), torch.get_num_threads())

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
    say = print if run.dist_info.is_main else (lambda *a, **k: None)
    for i, (seed, s) in enumerate(todo, 1):
        if agree(deadline.next_epoch_passes(), run.dist_info):
            return True
        keeper = RunKeeper(resume_path(run.out, s, seed), run.config_hash, s, seed, deadline, say)
        metrics, state = train_run(run.cfg, s, seed, run.data, run.dist_info, progress, desc=f"{s.name} seed{seed}",
                                   keeper=keeper)
        if metrics is None:
            return True
        if run.dist_info.is_main:
            save_run(run, s, seed, metrics, state)
            keeper.discard()
            report_run(i, len(todo), s, seed, metrics, t_start)
    return False

_WORKER: dict[str, Any] = {}  # this worker process's StudyRun and deadline (set by _init_worker)


def job_devices(device_type: str, index: int | None, cuda_count: int) -> list[str]:
    """The devices jobs take in turn: every visible GPU for cuda without an index, else the one device."""
    if device_type == "cuda" and index is None:
        return [f"cuda:{i}" for i in range(max(cuda_count, 1))]
    return [device_type if index is None else f"{device_type}:{index}"]


def threads_per_job(threads: int | None, jobs: int, available: int) -> int:
    """CPU threads for each of `jobs` processes: --threads (or torch's default `available`) split evenly."""
    return max(1, (threads or available) // jobs)


def _init_worker(spec: dict[str, Any], slots: Any) -> None:
    """Once per worker: its slot -> device; threads; the data on the device; a StudyRun to save checkpoints with."""
    slot = slots.get()
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["devices"][slot % len(spec["devices"])])
    if device.type == "cuda":
        device = setup_cuda(device)
    opts = spec["opts"]
    data = load_study_data(opts, device)
    _WORKER["run"] = StudyRun(spec["study"], opts, [], run_config(opts), DistInfo(0, 1, device), data,
                              Path(spec["out"]), spec["config_hash"])
    _WORKER["deadline"] = Deadline(spec["deadline_at"])


def _train(seed: int, setting: dict[str, Any]) -> dict[str, Any] | None:
    """In a worker: train (or resume) one run and write its checkpoint -> its metrics and device; None if the
    deadline stopped it (or came before it started)."""
    run, deadline = _WORKER["run"], _WORKER["deadline"]
    s = Setting(**setting)
    if deadline.next_epoch_passes():
        return None
    keeper = RunKeeper(resume_path(run.out, s, seed), run.config_hash, s, seed, deadline)
    metrics, state = train_run(run.cfg, s, seed, run.data, run.dist_info, keeper=keeper)
    if metrics is None:
        return None
    save_checkpoint(run, s, seed, metrics, state)
    keeper.discard()
    return {"metrics": metrics, "device": str(run.dist_info.device), "threads": torch.get_num_threads()}


def run_parallel(run: StudyRun, todo: list[tuple[int, Setting]], jobs: int, deadline: Deadline) -> bool:
    """Train `todo` on min(`jobs`, runs) worker processes, each with the threads of a `jobs`-way split (so a
    resumed study's last run computes what it would have alongside the others); the rows are written here
    as runs finish. True if the deadline stopped it."""
    dev = run.dist_info.device
    spec = {"study": run.study, "opts": run.opts, "out": str(run.out), "config_hash": run.config_hash,
            "devices": job_devices(dev.type, dev.index, torch.cuda.device_count() if dev.type == "cuda" else 0),
            "threads": threads_per_job(run.opts.threads, jobs, torch.get_num_threads()),
            "deadline_at": deadline.at}
    same = f" (the numbers of one-by-one runs with --threads {spec['threads']})" if dev.type == "cpu" else ""
    workers = min(jobs, len(todo))
    print(f"{workers} jobs on {', '.join(spec['devices'][:workers])}, {spec['threads']} thread(s) each{same}",
          flush=True)
    ctx = mp.get_context("spawn")
    slots = ctx.Queue()
    for k in range(workers):
        slots.put(k)
    stopped, t_start, n_done = False, time.perf_counter(), 0
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(spec, slots)) as pool:
        futures = {pool.submit(_train, seed, asdict(s)): (seed, s) for seed, s in todo}
        try:
            for fut in as_completed(futures):
                seed, s = futures[fut]
                result = fut.result()
                if result is None:
                    stopped = True
                    continue
                append_result(run, s, seed, result["metrics"], result["device"], result["threads"])
                n_done += 1
                report_run(n_done, len(todo), s, seed, result["metrics"], t_start)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return stopped
