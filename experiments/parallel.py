"""`--jobs N`: N (setting, seed) runs of a study at once, each in its own process.

Small models leave a GPU mostly idle, so several runs share it; with several GPUs visible (and `--device`
auto or cuda) job k uses GPU k mod count; on a CPU the threads are split between the jobs (a CPU run's numbers
depend on its thread count: `--jobs N --threads T` reproduces one-by-one runs with `--threads T/N`). Each worker
process loads the data once, then trains the runs it is handed with the same `train_run` as the sequential
path (same seeds -> same numbers: a run's randomness comes from its own seeded streams, never from what ran
before it in the process) and writes the run's checkpoint; the parent writes the rows and the summary.
Workers start with `spawn` (CUDA cannot be forked). Runs that need several GPUs use torchrun instead.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Deadline, RunKeeper
from .engine import DistInfo, Setting, train_run
from .study import (
    StudyRun,
    append_result,
    load_study_data,
    report_run,
    resume_path,
    run_config,
    save_checkpoint,
    setup_cuda,
)

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
                              Path(spec["out"]), spec["chash"])
    _WORKER["deadline"] = Deadline(spec["deadline_at"])


def _train(seed: int, setting: dict[str, Any]) -> dict[str, Any] | None:
    """In a worker: train (or resume) one run and write its checkpoint -> its metrics and device; None if the
    deadline stopped it (or came before it started)."""
    run, deadline = _WORKER["run"], _WORKER["deadline"]
    s = Setting(**setting)
    if deadline.next_epoch_passes():
        return None
    keeper = RunKeeper(resume_path(run.out, s, seed), run.chash, s, seed, deadline)
    metrics, state = train_run(run.cfg, s, seed, run.data, run.di, keeper=keeper)
    if metrics is None:
        return None
    save_checkpoint(run, s, seed, metrics, state)
    keeper.discard()
    return {"metrics": metrics, "device": str(run.di.device), "threads": torch.get_num_threads()}


def run_parallel(run: StudyRun, todo: list[tuple[int, Setting]], jobs: int, deadline: Deadline) -> bool:
    """Train `todo` on min(`jobs`, runs) worker processes, each with the threads of a `jobs`-way split (so a
    resumed study's last run computes what it would have alongside the others); the rows are written here
    as runs finish. True if the deadline stopped it."""
    dev = run.di.device
    spec = {"study": run.study, "opts": run.opts, "out": str(run.out), "chash": run.chash,
            "devices": job_devices(dev.type, dev.index, torch.cuda.device_count() if dev.type == "cuda" else 0),
            "threads": threads_per_job(run.opts.get("threads"), jobs, torch.get_num_threads()),
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
