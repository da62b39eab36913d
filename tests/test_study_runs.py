"""Long runs survive, several at once, compiled once: each check compares with the plain run, bit for bit.

CPU only, a tiny ResNet-8 on the synthetic data: interrupted + resumed == uninterrupted; --jobs 2 ==
one by one; compiled (dynamo's eager backend) == eager, with the second seed compiling nothing.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments import checkpoint, depth_ablation, engine, results
from experiments.data import make_synthetic
from experiments.engine import RunConfig, Setting

TINY = ["--dataset", "synthetic", "--model", "resnet8_cifar", "--model-kwargs", "width=4", "--eval-batch-size", "48",
        "--batch-size", "24", "--no-progress", "--layers", "2"]
TIMING = {"train_time_s", "eval_time_s", "compile_time_s", "images_per_s", "finished_at"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _measured(out: Path) -> dict[tuple[str, int], dict]:
    """The rows of a study by (setting, seed), without the fields that time the run."""
    return {(r["setting"], r["seed"]): {k: v for k, v in r.items() if k not in TIMING} for r in results.load_rows(out)}


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, weights_only=False)["model_state"] for p in sorted((out / "ckpt").glob("*.pt"))}


def _same_weights(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, capsys):
    """--max-minutes tiny: every invocation trains one epoch, saves and exits 3; the same command resumes.
    The final rows (errors, losses, history in the checkpoint) and weights equal an uninterrupted run's."""
    args = TINY + ["--epochs", "3", "--eval-every", "1", "--seeds", "0", "--threads", "1"]
    depth_ablation.main(args + ["--out", str(tmp_path / "straight")])
    calls = 0
    while True:
        calls += 1
        try:
            depth_ablation.main(args + ["--out", str(tmp_path / "cut"), "--max-minutes", "1e-6"])
            break
        except SystemExit as e:
            assert e.code == 3, f"invocation {calls} exited {e.code}"
            assert "run the same command again" in capsys.readouterr().err
            assert calls < 10
    assert calls == 6  # 2 runs x 3 epochs, one epoch per invocation (the last one finishes)
    assert _measured(tmp_path / "straight") == _measured(tmp_path / "cut")
    straight, cut = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert _same_weights(straight, cut)
    hist = [torch.load(tmp_path / d / "ckpt" / "layer2_seed0.pt", weights_only=False)["metrics"]["history"]
            for d in ("straight", "cut")]
    assert hist[0] == hist[1] and [e["epoch"] for e in hist[0]] == [1, 2, 3]
    assert not list((tmp_path / "cut" / "resume").iterdir())  # finished runs leave no resume state


def test_run_state_restores_every_stream(tmp_path):
    """The per-epoch state carries the model, SGD, schedule, sampler step and every generator: a run restored
    from it after epoch 1 (with cutmix_prob 0.5: the gate stream matters) ends where the straight run ends."""
    d = make_synthetic()
    cfg = RunConfig(model="resnet8_cifar", model_kwargs={"width": 4}, epochs=2, batch_size=24, eval_every=1,
                    eval_batch_size=48, cutmix_prob=0.5)
    s = Setting("mix", layer=[1, 3], variant="scheduled")
    straight = engine.start_run(cfg, s, 5, d, engine.DistInfo())
    while not straight.done:
        engine.run_epoch(straight)
    first = engine.start_run(cfg, s, 5, d, engine.DistInfo())
    engine.run_epoch(first)
    state = checkpoint.run_state(first)
    assert state["sampler"]["step"] == first.nets.sampler.step > 0
    checkpoint.save_atomic(state, tmp_path / "state.pt")
    torch.manual_seed(123)  # whatever the process did in between
    resumed = engine.start_run(cfg, s, 5, d, engine.DistInfo())
    checkpoint.load_run_state(resumed, torch.load(tmp_path / "state.pt", weights_only=False))
    assert resumed.epoch == 1 and resumed.nets.sampler.step == first.nets.sampler.step
    engine.run_epoch(resumed)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.log.history == resumed.log.history
    assert torch.equal(straight.streams.mix.get_state(), resumed.streams.mix.get_state())


def test_keeper_ignores_state_of_another_run(tmp_path):
    """A resume file of another setting or seed is never loaded into this run."""
    d = make_synthetic()
    cfg = RunConfig(model="resnet8_cifar", model_kwargs={"width": 4}, epochs=2, batch_size=32)
    said = []
    run = engine.start_run(cfg, Setting("baseline"), 0, d, engine.DistInfo())
    engine.run_epoch(run)
    checkpoint.RunKeeper(tmp_path / "r.pt", "abc", Setting("baseline"), 0).save(run)
    other = engine.start_run(cfg, Setting("baseline"), 1, d, engine.DistInfo())
    checkpoint.RunKeeper(tmp_path / "r.pt", "abc", Setting("baseline"), 1, say=said.append).restore(other)
    assert other.epoch == 0 and "afresh" in said[0]
    same = engine.start_run(cfg, Setting("baseline"), 0, d, engine.DistInfo())
    checkpoint.RunKeeper(tmp_path / "r.pt", "abc", Setting("baseline"), 0, say=said.append).restore(same)
    assert same.epoch == 1 and "resuming" in said[1]


def test_deadline_needs_progress_and_looks_ahead(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(checkpoint.time, "time", lambda: now[0])
    d = checkpoint.Deadline.after_minutes(1.0)  # at 1060
    assert d.at == 1060.0 and not checkpoint.Deadline.after_minutes(None).passed(1e9)
    now[0] = 2000.0
    assert not d.passed()  # no epoch trained yet in this process: never stops before one
    d.progressed = True
    now[0] = 1030.0
    assert not d.passed(20.0) and d.passed(40.0)  # an epoch of 40 s would end past it
    d.epoch_done(40.0)  # the next run's first epoch is judged by the latest epoch's length
    assert d.next_epoch_passes() and not checkpoint.Deadline(d.at, True, 20.0).next_epoch_passes()


def test_jobs_equal_one_by_one(tmp_path):
    """--jobs 2 (two processes, one thread each) writes the rows and checkpoints of the runs one by one."""
    args = TINY + ["--epochs", "2", "--seeds", "0", "1"]
    depth_ablation.main(args + ["--out", str(tmp_path / "seq"), "--threads", "1"])
    depth_ablation.main(args + ["--out", str(tmp_path / "par"), "--threads", "2", "--jobs", "2"])
    seq, par = _measured(tmp_path / "seq"), _measured(tmp_path / "par")
    assert len(seq) == 4 and seq == par
    assert _same_weights(_weights(tmp_path / "seq"), _weights(tmp_path / "par"))
    summary = [(tmp_path / d / "summary.md").read_text() for d in ("seq", "par")]
    assert summary[0] == summary[1]
    (tmp_path / "par" / "ckpt" / "layer2_seed1.pt").unlink()  # one run left: still a job with the 2-way split
    depth_ablation.main(args + ["--out", str(tmp_path / "par"), "--threads", "2", "--jobs", "2"])
    assert _measured(tmp_path / "par") == seq and len(results.load_rows(tmp_path / "par")) == 5
    assert _same_weights(_weights(tmp_path / "seq"), _weights(tmp_path / "par"))


def test_compiled_study_reuses_graphs_and_equals_eager(tmp_path):
    """torch.compile (dynamo's eager backend: the captured graphs run the same kernels) gives the eager numbers
    bit for bit; seed 1 reuses every graph of seed 0 (fresh model instances, same structure and shapes), and
    the compile time is reported apart from the training time."""
    torch._dynamo.reset()
    args = TINY + ["--epochs", "2", "--seeds", "0", "1", "--cutmix-prob", "1", "--threads", "1", "--layers", "0", "2"]
    depth_ablation.main(args + ["--out", str(tmp_path / "eager")])
    depth_ablation.main(args + ["--out", str(tmp_path / "compiled"), "--compile", "--compile-backend", "eager"])
    rows = {(r["setting"], r["seed"]): r for r in results.load_rows(tmp_path / "compiled")}
    assert all(rows[(s, 0)]["compiled_graphs"] > 0 and rows[(s, 0)]["compile_time_s"] > 0
               for s in ("baseline", "layer0", "layer2"))
    assert all(rows[(s, 1)]["compiled_graphs"] == 0 and rows[(s, 1)]["compile_time_s"] == 0
               for s in ("baseline", "layer0", "layer2"))
    strip = {"compiled_graphs"}
    eager = {k: {f: v for f, v in r.items() if f not in strip} for k, r in _measured(tmp_path / "eager").items()}
    compiled = {k: {f: v for f, v in r.items() if f not in strip} for k, r in _measured(tmp_path / "compiled").items()}
    assert eager == compiled
    assert _same_weights(_weights(tmp_path / "eager"), _weights(tmp_path / "compiled"))


@pytest.mark.slow
def test_ddp_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    """Under torchrun (2 processes, gloo) rank 0 gathers both ranks' streams into the per-epoch state and
    hands them back on resume: stopped after every epoch, the study ends with the uninterrupted numbers."""
    import os
    import socket
    import subprocess
    import sys

    def torchrun(out: Path, extra: list[str]) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "experiments.depth_ablation", *TINY, "--epochs", "2", "--seeds", "0",
               "--device", "cpu", "--threads", "1", "--out", str(out), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        root = Path(__file__).resolve().parents[1]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]  # a stop, too: torchrun's rule
        return proc.stderr

    torchrun(tmp_path / "straight", [])
    stops = ["stopped by --max-minutes" in torchrun(tmp_path / "cut", ["--max-minutes", "1e-6"]) for _ in range(4)]
    assert stops == [True, True, True, False]  # 2 runs x 2 epochs, one epoch per invocation
    assert _measured(tmp_path / "straight") == _measured(tmp_path / "cut")
    assert _same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "cut"))
