"""The per-batch draw: one gate, one lam, one box centre, one permutation (and one mixing site).

Everything random about a CutMix batch is drawn here, once, on the host, from a CPU
``torch.Generator``. Drawing on the host keeps the same seed giving the same draws on CPU and GPU and
means the box is known as Python integers without a device round trip. The draw does not know the
grid it will be applied to: the box centre is stored as a fraction of each side and placed on
whatever grid the mixing site has (``MixDraw.place``), which keeps the centre uniform on every grid,
as the reference code's ``randint(0, H)`` is.
"""
from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.utils.data import get_worker_info

from .placement import Box, Placement, box_on_grid, place
from .validation import check_int, check_real

VARIANTS = ("cutmix", "center_gaussian", "fixed_size", "scheduled", "one_hot", "complete_label")


@dataclass(frozen=True)
class MixDraw:
    """One batch's draw. ``mixed`` False means the batch trains unmixed (lam = 1)."""

    mixed: bool
    lam: float                   # the Beta draw before the box correction
    center: Tuple[float, float]  # box centre as fractions in [0, 1) of (height, width)
    perm: torch.Tensor           # CPU int64 permutation: partner of sample i is sample perm[i]
    site: int                    # index of the one candidate site that mixes in this forward pass
    variant: str = "cutmix"

    def place(self, h: int, w: int) -> Placement:
        """Box, corrected lam and label weight on an h x w grid (``featmix.placement.place``)."""
        return place(self.lam, self.center, h, w, self.variant)

    def box_on_grid(self, h: int, w: int) -> Box:
        """The box alone on an h x w grid (reference rule: truncation, clipping)."""
        return box_on_grid(self.lam, self.center, h, w, self.variant)

    def params(self) -> torch.Tensor:
        """float64 [lam, centre_y, centre_x]: what ``featmix.placement.place_tensor`` reads."""
        return torch.frombuffer(bytearray(struct.pack("<3d", self.lam, *self.center)), dtype=torch.float64)

    def packed(self, inverse: bool = True, params: bool = True) -> torch.Tensor:
        """The draw as one host int64 tensor: ``[perm, inverse perm, float64 bits of params]`` (parts optional)."""
        parts = [self.perm]
        if inverse:
            parts.append(self.perm.argsort())  # the inverse of a permutation
        if params:
            parts.append(self.params().view(torch.int64))
        return torch.cat(parts) if len(parts) > 1 else self.perm


def load_draw(buf: Optional[torch.Tensor], draw: MixDraw, device: torch.device, inverse: bool = True,
              params: bool = True) -> torch.Tensor:
    """``draw.packed(...)`` on ``device`` in one transfer, into ``buf`` when its size and device fit.

    Reusing ``buf`` keeps its storage (``data_ptr``) from step to step, as CUDA-graph replay needs; on
    CUDA the host side is pinned, so the copy is asynchronous. Read it back with ``unpack_draw``.
    """
    host = draw.packed(inverse, params)
    if buf is None or buf.shape != host.shape or buf.device != device:
        buf = torch.empty_like(host, device=device)
    if device.type == "cuda":
        host = host.pin_memory()
    return buf.copy_(host, non_blocking=True)


def unpack_draw(buf: torch.Tensor, batch: int, inverse: bool = True, params: bool = True
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(perm, inverse perm, float64 params) views of a ``load_draw`` buffer (None for parts left out)."""
    inv = buf[batch:2 * batch] if inverse else None
    return buf[:batch], inv, buf[-3:].view(torch.float64) if params else None


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``."""
    return perm.argsort()


def check_generator(generator: object) -> Optional[torch.Generator]:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (draws are made on the host so the same seed "
                         f"gives the same draws on every device and no device sync is needed); got one on "
                         f"{generator.device}")
    return generator


def _worker_seed(base: int, worker_seed: int) -> int:
    """A 63-bit seed from the generator's seed and the DataLoader worker's seed (stable run to run)."""
    digest = hashlib.sha256(f"featmix:{base}:{worker_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class MixSampler:
    """Draws one ``MixDraw`` per training batch; holds the only mutable state (the schedule step).

    All randomness comes from ``generator`` (a CPU ``torch.Generator``; torch's default CPU generator
    when None). The same number of values is drawn for every batch whatever the gate says, so two runs
    with the same seed that differ only in ``prob`` see the same lam/box/permutation stream. In a
    DataLoader worker a seeded generator is reseeded once from its seed and the worker's seed (which
    torch derives per worker and per epoch), so workers draw different, reproducible streams.
    """

    def __init__(self, alpha: float = 1.0, prob: float = 1.0, variant: str = "cutmix", *,
                 total_steps: Optional[int] = None, center_std: float = 0.25,
                 generator: Optional[torch.Generator] = None) -> None:
        self.variant = variant
        self.total_steps = total_steps
        if self.variant == "scheduled" and self.total_steps is None:
            raise ValueError("variant='scheduled' needs total_steps= (an int > 0: the number of training "
                             "steps over which prob ramps from 0 to its value)")
        self.alpha = alpha
        self.prob = prob
        self.center_std = center_std
        self.generator = check_generator(generator)
        self.step = 0  # batches drawn so far: drives variant="scheduled"
        self._reseeded_for: Optional[int] = None  # the DataLoader worker seed this copy was reseeded for

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_real(value, "alpha", 0.0, math.inf, low_open=True, meaning="lam ~ Beta(alpha, alpha)")
        self._conc = torch.full((2,), self._alpha, dtype=torch.float64)  # Beta(a, a) as Dirichlet(a, a)

    @property
    def prob(self) -> float:
        return self._prob

    @prob.setter
    def prob(self, value: float) -> None:
        self._prob = check_real(value, "prob", 0.0, 1.0, meaning="the chance a batch is mixed")

    @property
    def center_std(self) -> float:
        return self._center_std

    @center_std.setter
    def center_std(self, value: float) -> None:
        self._center_std = check_real(value, "center_std", 0.0, math.inf, low_open=True,
                                      meaning="std of the box centre as a fraction of the side, "
                                              "variant='center_gaussian'")

    @property
    def variant(self) -> str:
        return self._variant

    @variant.setter
    def variant(self, value: str) -> None:
        if value not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(repr(v) for v in VARIANTS)}; got {value!r}")
        self._variant = value

    @property
    def total_steps(self) -> Optional[int]:
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: Optional[int]) -> None:
        self._total_steps = None if value is None else check_int(value, "total_steps", 1, "the schedule's length")

    def current_prob(self) -> float:
        """The gate probability for the next batch (ramps linearly for variant='scheduled')."""
        if self.variant == "scheduled":
            return self.prob * min(1.0, self.step / float(self.total_steps))
        return self.prob

    def draw(self, batch_size: int, num_sites: int = 1) -> MixDraw:
        """Draw gate, lam, centre, permutation and site for one batch of ``batch_size`` samples."""
        g = self._stream()
        p = self.current_prob()
        self.step += 1
        u = torch.rand(5, generator=g, dtype=torch.float64).tolist()  # gate, centre y, x, site, lam
        lam = self._beta(g, u[4])
        perm = torch.randperm(batch_size, generator=g)
        center = self._center(u[1], u[2], g)
        if self.variant == "fixed_size":
            lam = 0.75
        site = min(int(u[3] * num_sites), num_sites - 1)
        mixed = bool(u[0] < p) and batch_size > 1
        return MixDraw(mixed=mixed, lam=lam, center=center, perm=perm, site=site, variant=self.variant)

    def _stream(self) -> Optional[torch.Generator]:
        """The generator to draw from; in a DataLoader worker, reseeded once for that worker."""
        info = get_worker_info()
        if info is None:
            return self.generator
        if self.variant == "scheduled":
            raise RuntimeError("variant='scheduled' counts batches in the process that draws, and each DataLoader "
                               "worker would count its own share and restart every epoch: apply it in the main "
                               "process (on the batches the DataLoader returns), not in a worker's collate_fn")
        if self.generator is not None and self._reseeded_for != info.seed:
            self.generator.manual_seed(_worker_seed(self.generator.initial_seed(), info.seed))
            self._reseeded_for = info.seed
        return self.generator

    def _center(self, uy: float, ux: float, g: Optional[torch.Generator]) -> Tuple[float, float]:
        """Box centre as fractions of (height, width): uniform, or Gaussian around the middle."""
        if self.variant == "center_gaussian":
            z = torch.randn(2, generator=g, dtype=torch.float64).tolist()
            cy, cx = (min(max(0.5 + self.center_std * zi, 0.0), math.nextafter(1.0, 0.0)) for zi in z)
            return cy, cx
        return uy, ux

    def _beta(self, g: Optional[torch.Generator], u: float) -> float:
        # Beta(1, 1) is Uniform(0, 1): the paper's alpha = 1 takes the uniform already drawn. Otherwise
        # Beta(a, a) is the first coordinate of Dirichlet(a, a): torch.distributions.Beta takes no
        # generator, the Dirichlet kernel does (and handles small alpha without 0/0).
        if self._alpha == 1.0:
            return u
        return torch._sample_dirichlet(self._conc, generator=g).tolist()[0]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def __repr__(self) -> str:
        extra = f", total_steps={self.total_steps}" if self.total_steps else ""
        return (f"MixSampler(alpha={self.alpha}, prob={self.prob}, variant={self.variant!r}{extra}, "
                f"step={self.step})")
