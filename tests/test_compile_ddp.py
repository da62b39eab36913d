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
        boxes = [(r.layer, r.box) if r else None for r in records]
        torch.save({"state": dict(net.named_parameters()), "records": boxes},
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


# -- the GPU path's contract, checked on CPU: persistent draw buffers, bounded graphs, same gradients ----

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_draw_buffers_keep_their_storage_across_steps(device):
    """CUDA-graph replay reads the draw from fixed addresses: the buffers are reused, never reallocated.
    On the CPU (no CUDA graphs) the transforms and the sites use the host draw itself and keep no buffer."""
    w = featmix.CutMixAt(TinyNet(), layer=[0, 2, 3], generator=gen(0)).train().to(device)
    cutmix = featmix.CutMix(10, generator=gen(1))
    ptrs = {}
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = torch.randn(8, 3, 16, 16, generator=g).to(device), torch.randint(0, 10, (8,), generator=g).to(device)
        cutmix(x, y)
        if device == "cpu":
            assert cutmix.draw_buffer is None
        else:
            ptrs.setdefault("cutmix", set()).add(cutmix.draw_buffer.data_ptr())
        w(x, y)
        site = next(s for s in w.sites if s.label == w.last_mix.layer)
        if device == "cpu":
            assert site.draw_buffer is None
        else:
            ptrs.setdefault(site.label, set()).add(site.draw_buffer.data_ptr())
    assert set(ptrs) == (set() if device == "cpu" else {"cutmix", 0, 2, 3})
    assert all(len(p) == 1 for p in ptrs.values()), ptrs


@pytest.mark.parametrize("variant,layer", [("cutmix", 2)] + [(v, "random") for v in featmix.VARIANTS])
def test_one_graph_per_site_plus_one_unmixed_over_50_batches(variant, layer):
    torch._dynamo.reset()
    torch.manual_seed(0)
    kw = {"total_steps": 20} if variant == "scheduled" else {}
    w = featmix.CutMixAt(TinyNet(), layer=layer, prob=0.5, variant=variant, generator=gen(2), **kw)
    backend = CountingBackend()
    compiled = torch.compile(w, backend=backend).train()
    states, graphs_seen = set(), []
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
        logits, targets = compiled(x, y)
        F.cross_entropy(logits, targets).backward()
        states.add(None if w.last_mix is None else w.last_mix.layer)
        graphs_seen.append(backend.graphs)
    assert None in states and len(states) == len(w.sites) + 1, states
    assert backend.graphs == len(states), "one graph per mixing site plus one unmixed, none per batch"


@pytest.mark.parametrize("layer", [0, 3, "random"])
def test_compiled_outputs_and_gradients_equal_eager(layer):
    def run(compile_: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = TinyNet()
        w = featmix.CutMixAt(net, layer=layer, prob=0.7, generator=gen(3)).train()
        call = torch.compile(w, backend=CountingBackend()) if compile_ else w
        g, out = torch.Generator().manual_seed(2), []
        for _ in range(8):
            x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g)
            net.zero_grad()
            logits, targets = call(x, y)
            F.cross_entropy(logits, targets).backward()
            out.append((logits.detach(), targets, [p.grad.clone() for p in net.parameters()]))
        return out

    for (la, ta, ga), (lb, tb, gb) in zip(run(True), run(False)):
        torch.testing.assert_close(ta, tb, rtol=0, atol=1e-6)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiles_the_mixed_model_and_matches_eager():
    """The real compiler (C++ on CPU): the gather paste lowers and gives the eager numbers."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = TinyNet()
    ref = TinyNet()
    ref.load_state_dict(net.state_dict())
    wc = torch.compile(featmix.CutMixAt(net, layer=2, variant="fixed_size", generator=gen(4))).train()
    we = featmix.CutMixAt(ref, layer=2, variant="fixed_size", generator=gen(4)).train()
    x, y = torch.randn(4, 3, 16, 16, generator=gen(5)), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        (lc, tc), (le, te) = wc(x, y), we(x, y)
        F.cross_entropy(lc, tc).backward()
        F.cross_entropy(le, te).backward()
        torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tc, te)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)


def test_a_stale_compiled_graph_without_the_hook_is_an_error_that_names_the_remedy():
    """Dynamo does not guard on forward hooks: a graph of the same class compiled before wrapping runs
    without the mixing layer. featmix says so (never an unmixed batch), and the remedy works."""
    torch._dynamo.reset()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):  # torch's default
        torch.compile(TinyNet().train(), backend="eager")(x)  # e.g. an earlier run of the plain model
        net = TinyNet()
        w = featmix.CutMixAt(net, layer=2, generator=gen(0)).train()
        w.model = torch.compile(net, backend="eager")
        with pytest.raises(RuntimeError, match=r"did not mix this batch.*torch.compile ran a graph of this model's "
                                               r"class compiled before the mixing layer's hook was attached"):
            w(x, y)
        torch._dynamo.reset()
        w(x, y)
    assert w.last_mix is not None and w.last_mix.grid == (16, 16)
