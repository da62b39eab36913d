"""torch.compile (no recompile per batch, same result as eager) and DistributedDataParallel on gloo."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import featmix
from tests.conftest import TinyNet, gen


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts compilations."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _steps(model, wrapper_call, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        logits, targets = wrapper_call(x, y)
        F.cross_entropy(logits, targets).backward()
        out.append((logits.detach(), targets))
    return out


@pytest.mark.parametrize("layer", [2, "random"])
def test_compile_no_recompile_per_batch_and_matches_eager(layer):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = TinyNet()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    w = featmix.CutMixAt(net, layer=layer, prob=0.8, generator=gen(3))
    backend = CountingBackend()
    compiled = torch.compile(w, backend=backend)
    compiled.train()
    results = _steps(net, compiled, 30)
    sites = len(w.sites)
    # one graph per (mixed at site k) plus one unmixed, at most; none per batch
    assert backend.graphs <= sites + 1 + 2, backend.graphs
    graphs_after_warmup = backend.graphs
    _steps(net, compiled, 10, seed=1)
    assert backend.graphs == graphs_after_warmup
    # the compiled (tensor) path pastes exactly what the eager (host) path pastes
    torch.manual_seed(0)
    net2 = TinyNet()
    net2.load_state_dict(state)
    w2 = featmix.CutMixAt(net2, layer=layer, prob=0.8, generator=gen(3))
    w2.train()
    eager = _steps(net2, w2, 30)
    for (la, ta), (lb, tb) in zip(results, eager):
        torch.testing.assert_close(ta, tb, rtol=0, atol=1e-6)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)


def test_compile_inner_model_fullgraph():
    """Compiling only the wrapped model (draw and targets stay eager) is one graph per site state."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = TinyNet()
    backend = CountingBackend()
    w = featmix.CutMixAt(net, layer=3, generator=gen(0))
    w.model = torch.compile(net, backend=backend, fullgraph=True)
    w.train()
    _steps(net, w, 12)
    assert 1 <= backend.graphs <= 2
    assert w.last_mix is not None and isinstance(w.last_mix.lam, torch.Tensor)
    area = (1 - w.last_mix.lam) * 64
    assert float(area) == pytest.approx(round(float(area)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks
        net = TinyNet()
        wrapper = featmix.CutMixAt(net, layer="random", generator=torch.Generator().manual_seed(100 + rank))
        ddp = torch.nn.parallel.DistributedDataParallel(wrapper)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ddp.train()
        g = torch.Generator().manual_seed(rank)
        records = []
        for _ in range(3):
            x = torch.randn(6, 3, 16, 16, generator=g)
            y = torch.randint(0, 10, (6,), generator=g)
            logits, targets = ddp(x, y)
            loss = F.cross_entropy(logits, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            records.append(wrapper.last_mix)
        torch.save({"state": dict(net.named_parameters()), "records": [(r.layer, r.box) if r else None for r in records]},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # parameters stay in sync (gradients all-reduced); BN running stats are per rank between broadcasts
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), f"weights diverged across ranks at {k}"
    torch.manual_seed(0)
    assert not torch.equal(r0["state"]["fc.weight"], TinyNet().fc.weight.detach()), "the steps trained"
    # each rank draws from its own generator: the mixes differ between ranks
    assert r0["records"] != r1["records"]
