"""GPU checks (DESIGN.md): the device kernels equal the CPU reference, draws do not depend on the device,
and a training step makes no host-device sync. Skipped where CUDA is absent (they are not counted as
passes there); `experiments/gpu_checks.sh` runs them on a lent GPU.

``FEATMIX_TEST_DEVICE=cpu pytest tests/test_cuda.py`` runs the device-independent ones on the CPU, which
checks the tests themselves on a machine without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as TF

import featmix
import featmix.functional as F
from tests.conftest import TinyNet, gen, reference

DEVICE = os.environ.get("FEATMIX_TEST_DEVICE", "cuda")
needs_device = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                  reason="needs CUDA (FEATMIX_TEST_DEVICE=cpu runs these on the CPU)")
needs_cuda = pytest.mark.skipif(not (DEVICE.startswith("cuda") and torch.cuda.is_available()),
                                reason="needs CUDA: the sync debug mode exists only there")


SHAPES_BOXES = [((6, 3, 9, 11), (2, 7, 3, 8)), ((6, 3, 9, 11), (2, 6, 0, 11)), ((5, 8, 70, 70), (3, 68, 2, 69)),
                ((4, 16, 33, 20), (0, 33, 0, 20))]


@needs_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,box", SHAPES_BOXES)
def test_device_kernels_equal_the_cpu_reference(shape, box, dtype):
    x_cpu = torch.randn(shape, generator=gen(0)).to(dtype)
    perm = torch.randperm(shape[0], generator=gen(1))
    want = reference(x_cpu, perm, box)
    x = x_cpu.to(DEVICE)
    assert torch.equal(F.paste_box(x, perm, box).cpu(), want)
    assert torch.equal(F.paste_box_masked(x, perm, torch.tensor(box)).cpu(), want)
    y = x.clone()
    assert F.paste_box_(y, perm, box) is y
    assert torch.equal(y.cpu(), want)


@needs_device
def test_device_gradient_equals_the_cpu_gradient():
    shape, box = (5, 8, 70, 70), (3, 68, 2, 69)
    x_cpu = torch.randn(shape, generator=gen(2))
    w = torch.randn(shape, generator=gen(3))
    perm = torch.randperm(shape[0], generator=gen(4))
    grads = []
    for dev in ("cpu", DEVICE):
        x = x_cpu.to(dev).clone().requires_grad_(True)  # a fresh leaf on each device (.to("cpu") is a no-op)
        (F.paste_box(x, perm, box) * w.to(dev)).sum().backward()
        grads.append(x.grad.cpu())
    assert x_cpu.grad is None and not x_cpu.requires_grad
    assert torch.equal(grads[0], grads[1])


@needs_device
@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_a_record_keeps_its_values_after_the_next_call(mode):
    """A record's tensors are its own: not views of the draw buffer that the next call refills."""
    t = featmix.CutMix(4, mode=mode, correct_lam=False, generator=gen(0))
    x, y = torch.randn(6, 3, 8, 8, device=DEVICE), torch.arange(6, device=DEVICE) % 4
    t(x, y)
    record = t.last_mix
    kept = [v.clone() if isinstance(v, torch.Tensor) else v for v in (record.box, record.lam, record.weight)]
    t(x, y)
    for before, now in zip(kept, (record.box, record.lam, record.weight)):
        assert torch.equal(torch.as_tensor(before), torch.as_tensor(now))
    assert t.last_mix is not record


@needs_device
def test_same_seed_same_mix_on_cpu_and_device():
    """Draws are made on the host: the device changes nothing in what is mixed or in the targets."""
    images = torch.randn(8, 3, 32, 32, generator=gen(5))
    labels = torch.randint(10, (8,), generator=gen(6))
    results = []
    for dev in ("cpu", DEVICE):
        cutmix = featmix.CutMix(num_classes=10, generator=gen(7))
        out, targets = cutmix(images.to(dev), labels.to(dev))
        results.append((out.cpu(), targets.cpu(), cutmix.last_mix))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    on_cpu, on_device = results[0][2], results[1][2]
    assert torch.equal(on_cpu.perm, on_device.perm)
    assert (on_cpu.layer, on_cpu.grid, on_cpu.box, on_cpu.lam, on_cpu.weight, on_cpu.kind) == \
        (on_device.layer, on_device.grid, on_device.box, on_device.lam, on_device.weight, on_device.kind)


@needs_cuda
@pytest.mark.parametrize("layer", [0, 1, 2, "random"])
def test_training_step_makes_no_host_device_sync(layer):
    """DESIGN.md: no device sync per batch. After one warm-up step (lazy CUDA init may sync), a CutMixAt
    step and an in-place CutMix call run under set_sync_debug_mode('error')."""
    torch.manual_seed(0)
    net = featmix.CutMixAt(TinyNet(num_classes=10), layer=layer, num_classes=10, generator=gen(8)).to(DEVICE)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    cutmix = featmix.CutMix(num_classes=10, inplace=True, generator=gen(9))
    images = torch.randn(16, 3, 32, 32, generator=gen(10)).to(DEVICE)
    labels = torch.randint(10, (16,), generator=gen(11)).to(DEVICE)

    def step() -> torch.Tensor:
        x, _ = cutmix(images.clone(), labels)
        logits, targets = net(x, labels)
        loss = TF.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()
