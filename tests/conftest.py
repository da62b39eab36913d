"""Shared helpers for the featmix test-suite: everything is CPU-only and makes its own data."""
from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Hypothesis profiles (tests/test_oracle.py, tests/test_stateful.py). "ci": derandomized (the same examples
# every run, so a red CI is reproducible), no deadline (shared CPU cores), a few hundred examples over the
# whole suite. "slow": ten times as many examples, random, for the tests marked slow (``pytest -m slow``).
# Property tests size themselves with ``examples(n)``: n under "ci", 10 n under "slow".
# HYPOTHESIS_PROFILE=<name> overrides the choice.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=100, print_blob=True,
                          suppress_health_check=_QUIET)
settings.register_profile("slow", derandomize=False, deadline=None, max_examples=1000, print_blob=True,
                          suppress_health_check=_QUIET)


def pytest_configure(config: pytest.Config) -> None:
    markexpr = config.getoption("markexpr", "") or ""
    selects_slow = re.search(r"(?<!not )\bslow\b", markexpr) is not None
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("slow" if selects_slow else "ci"))


def examples(n: int) -> int:
    """A property test's example count: ``n`` under the "ci" profile, scaled with the loaded profile."""
    return max(1, n * settings().max_examples // 100)


def constant_images(batch: int, h: int, w: int, channels: int = 3, dtype=torch.float32) -> torch.Tensor:
    """Image i is filled with the value i, so every output pixel names the image it came from."""
    return torch.arange(batch, dtype=dtype).view(batch, 1, 1, 1).expand(batch, channels, h, w).contiguous()


def reference(x: torch.Tensor, perm: torch.Tensor, box) -> torch.Tensor:
    """The reference code's paste on (B, C, H, W): clone, then the box from ``x[perm]``."""
    y1, y2, x1, x2 = box
    out = x.clone()
    out[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    return out


def find_rectangle(diff: torch.Tensor):
    """(y1, y2, x1, x2) of the True cells of a 2-D mask if they form one filled rectangle, else None."""
    if not diff.any():
        return (0, 0, 0, 0)
    rows = diff.any(1).nonzero().flatten()
    cols = diff.any(0).nonzero().flatten()
    y1, y2, x1, x2 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    box = torch.zeros_like(diff)
    box[y1:y2, x1:x2] = True
    return (y1, y2, x1, x2) if torch.equal(box, diff) else None


class TinyNet(nn.Module):
    """A small CNN with a ResNet-style layout (conv1/bn1/act1, layer1..layer3, fc) and no feature_info.

    At H x W input the maps after act1, layer1, layer2, layer3 are H, H, H/2, H/4.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True))
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.layer3 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def one_thread():
    """One thread for tests of tiny tensors (faster than two, and much faster on shared cores); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
