"""The per-batch draw: one gate, one lam, one box centre, one permutation (and one mixing site).

Everything random about a CutMix batch is drawn here, once, on the host, from a CPU
``torch.Generator``. Drawing on the host keeps the same seed giving the same draws on CPU and GPU and
means the box is known as Python integers without a device round trip. The draw does not know the
grid it will be applied to: the box centre is stored as a fraction of each side and turned into an
integer cell on whatever grid the mixing site has (``box_on_grid``), which keeps the centre uniform on
every grid, as the reference code's ``randint(0, H)`` is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

VARIANTS = ("cutmix", "center_gaussian", "fixed_size", "scheduled", "one_hot", "complete_label")

Box = Tuple[int, int, int, int]  # (y1, y2, x1, x2), half-open, on one grid


def check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0 (lam ~ Beta(alpha, alpha)), got {alpha!r}")


def check_mix_args(alpha: float, prob: float, variant: str, total_steps: Optional[int],
                   center_std: float, label_smoothing: float, generator: Optional[torch.Generator]) -> None:
    """Validate the keyword arguments shared by CutMix, CutMixAt and MixSampler."""
    check_alpha(alpha)
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be a number in [0, 1] (the chance a batch is mixed), got {prob!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(repr(v) for v in VARIANTS)}; got {variant!r}")
    if variant == "scheduled":
        if total_steps is None:
            raise ValueError("variant='scheduled' needs total_steps= (an int > 0: the number of training "
                             "steps over which prob ramps from 0 to its value)")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps <= 0):
        raise ValueError(f"total_steps must be an int > 0, got {total_steps!r}")
    if isinstance(center_std, bool) or not isinstance(center_std, (int, float)) or not center_std > 0:
        raise ValueError(f"center_std must be a number > 0 (std of the box centre as a fraction of the "
                         f"side, variant='center_gaussian'), got {center_std!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
            or not 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (draws are made on the host so the "
                             f"same seed gives the same draws on every device and no device sync is "
                             f"needed); got one on {generator.device}")


@dataclass(frozen=True)
class MixDraw:
    """One batch's draw. ``mixed`` False means the batch trains unmixed (lam = 1)."""

    mixed: bool
    lam: float                   # the Beta draw before the box correction
    center: Tuple[float, float]  # box centre as fractions in [0, 1) of (height, width)
    perm: torch.Tensor           # CPU int64 permutation: partner of sample i is sample perm[i]
    site: int                    # index of the one candidate site that mixes in this forward pass
    variant: str = "cutmix"

    def box_on_grid(self, h: int, w: int) -> Box:
        """The box on an h x w grid with the reference code's rule (truncation, clipping)."""
        return box_on_grid(self.lam, self.center, h, w, self.variant)

    def label_weight(self, box: Box, h: int, w: int) -> float:
        """Weight of the sample's own label: the area it keeps, or the variant's rule."""
        if not self.mixed:
            return 1.0
        y1, y2, x1, x2 = box
        lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
        if self.variant == "one_hot":
            return 1.0 if lam >= 0.5 else 0.0
        if self.variant == "complete_label":
            return 0.5
        return lam


def box_on_grid(lam: float, center: Tuple[float, float], h: int, w: int, variant: str = "cutmix") -> Box:
    """Reference rule: cut = int(side * sqrt(1 - lam)), integer centre, half-sides cut // 2, clipped.

    ``fixed_size`` keeps the whole half-side box inside the grid (the paper's fixed 16 x 16 on 32 x 32),
    so its centre fraction places the box's top-left corner instead.
    """
    uy, ux = center
    if variant == "fixed_size":
        cut_h, cut_w = h // 2, w // 2
        y1 = min(int(uy * (h - cut_h + 1)), h - cut_h)
        x1 = min(int(ux * (w - cut_w + 1)), w - cut_w)
        return y1, y1 + cut_h, x1, x1 + cut_w
    rat = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * rat), int(w * rat)
    cy, cx = min(int(uy * h), h - 1), min(int(ux * w), w - 1)
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    return y1, y2, x1, x2


class MixSampler:
    """Draws one ``MixDraw`` per training batch; holds the only mutable state (the schedule step).

    All randomness comes from ``generator`` (a CPU ``torch.Generator``; torch's default CPU generator
    when None). The same number of values is drawn for every batch whatever the gate says, so two runs
    with the same seed that differ only in ``prob`` see the same lam/box/permutation stream.
    """

    def __init__(self, alpha: float = 1.0, prob: float = 1.0, variant: str = "cutmix", *,
                 total_steps: Optional[int] = None, center_std: float = 0.25,
                 generator: Optional[torch.Generator] = None) -> None:
        check_mix_args(alpha, prob, variant, total_steps, center_std, 0.0, generator)
        self.alpha = alpha
        self.prob = float(prob)
        self.variant = variant
        self.total_steps = total_steps
        self.center_std = float(center_std)
        self.generator = generator
        self.step = 0  # batches drawn so far: drives variant="scheduled"

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        check_alpha(value)
        self._alpha = float(value)
        self._conc = torch.full((2,), self._alpha, dtype=torch.float64)  # Beta(a, a) as Dirichlet(a, a)

    def current_prob(self) -> float:
        """The gate probability for the next batch (ramps linearly for variant='scheduled')."""
        if self.variant == "scheduled":
            return self.prob * min(1.0, self.step / float(self.total_steps))
        return self.prob

    def draw(self, batch_size: int, num_sites: int = 1) -> MixDraw:
        """Draw gate, lam, centre, permutation and site for one batch of ``batch_size`` samples."""
        g = self.generator
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

    def _center(self, uy: float, ux: float, g: Optional[torch.Generator]) -> Tuple[float, float]:
        """Box centre as fractions of (height, width): uniform, or Gaussian around the middle."""
        if self.variant == "center_gaussian":
            z = torch.randn(2, generator=g, dtype=torch.float64).tolist()
            cy, cx = (min(max(0.5 + self.center_std * zi, 0.0), math.nextafter(1.0, 0.0)) for zi in z)
            return cy, cx
        return uy, ux

    def _beta(self, g: Optional[torch.Generator], u: float) -> float:
        # Beta(1, 1) is Uniform(0, 1): the paper's alpha = 1 takes the uniform already drawn (one op
        # fewer per batch, a measurable share of the input-level transform). Otherwise Beta(a, a) is the
        # first coordinate of Dirichlet(a, a): torch.distributions.Beta takes no generator, the
        # Dirichlet kernel does (and handles small alpha without 0/0).
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


def resolve_sampler(sampler: Optional[MixSampler], **kwargs: Any) -> MixSampler:
    return sampler if sampler is not None else MixSampler(**kwargs)
