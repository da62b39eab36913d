"""The per-batch draw: gate, lam, box centre, permutation (and which site mixes, and which kind).

Everything random about a mixed batch is drawn here, once, on the host, from a CPU
``torch.Generator``. Drawing on the host keeps the same seed giving the same draws on CPU and GPU and
means the box is known as Python integers without a device round trip. The draw does not know the
grid it will be applied to: the box centre is stored as a fraction of each side and placed on
whatever grid the mixing site has (``MixDraw.place``), which keeps the centre uniform on every grid,
as the reference code's ``randint(0, H)`` is.

``mode="batch"`` (the paper's): one lam and one box for the whole batch. ``mode="elem"``: each sample
its own gate, lam, box (and CutMix-or-Mixup choice), as timm's ``mode='elem'``; ``mode="pair"``: the
permutation pairs samples up, and both samples of a pair share one lam and box (each gets the other's
region), as timm's ``mode='pair'``.
"""
from __future__ import annotations

import hashlib
import math
import struct
from typing import NamedTuple, Optional, Tuple

import torch
from torch.utils.data import get_worker_info

from .functional import inverse_permutation
from .kinds import KINDS, KINDS_BY_NAME, kind_of, place_tensor
from .placement import CUT_H, CUT_W, CX, CY, IS_CUT, LAM, Box, Placement, Rule, box_on_grid
from .validation import check_flag, check_int, check_real

VARIANTS = ("cutmix", "center_gaussian", "fixed_size", "scheduled", "one_hot", "complete_label")
MODES = ("batch", "elem", "pair")
_BOX_VARIANTS = ("center_gaussian", "fixed_size")


class MixDraw(NamedTuple):
    """One batch's draw. ``mixed`` False means the batch trains unmixed (lam = 1). Immutable (a named
    tuple: it is made once per batch; ``draw._replace(field=...)`` makes a changed copy).

    ``samples`` (per-sample modes only): float64 (6, B), one column of placement parameters per sample
    (rows as in ``featmix.placement``); the scalar fields then describe nothing.

    Example:
        >>> draw = featmix.MixDraw(mixed=True, lam=0.75, center=(0.5, 0.5), perm=torch.tensor([1, 0]), site=0)
        >>> draw.place(8, 8).box, draw.place(8, 8).lam
        ((2, 6, 2, 6), 0.75)
    """

    mixed: bool
    lam: float                   # the Beta draw before the box correction
    center: Tuple[float, float]  # box centre as fractions in [0, 1) of (height, width)
    perm: torch.Tensor           # CPU int64 permutation: partner of sample i is sample perm[i]
    site: int                    # index of the one candidate site that mixes in this forward pass
    variant: str = "cutmix"
    rule: Rule = Rule()          # kind (the per-batch switch resolved), label rule, box-size rule
    cut: Tuple[float, float] = (0.0, 0.0)  # Cutout side fractions, or the uniforms of cutmix_minmax
    samples: Optional[torch.Tensor] = None
    per_sample_kind: bool = False  # samples' row IS_CUT chooses CutMix or Mixup per sample

    @property
    def kind(self) -> str:
        return "cutmix_or_mixup" if self.per_sample_kind else self.rule.kind

    def place(self, h: int, w: int) -> Placement:
        """Region, corrected lam and label weight on an h x w grid (``featmix.placement``)."""
        if self.samples is not None:
            return place_tensor(self.samples, h, w, self.variant, self.rule, self.per_sample_kind)
        return KINDS_BY_NAME[self.rule.kind].place(self.lam, self.center, h, w, self.variant, self.rule, self.cut)

    def box_on_grid(self, h: int, w: int) -> Box:
        """The CutMix box alone on an h x w grid (reference rule: truncation, clipping)."""
        return box_on_grid(self.lam, self.center, h, w, self.variant)

    def params(self) -> torch.Tensor:
        """float64 parameters ``featmix.placement.place_tensor`` reads: (6,), or (6 * B,) per sample."""
        if self.samples is not None:
            return self.samples.flatten()
        return torch.frombuffer(bytearray(struct.pack("<6d", *self.param_values())), dtype=torch.float64)

    def param_values(self) -> Tuple[float, ...]:
        """A whole-batch draw's six parameters as Python floats, in the rows of ``featmix.placement``."""
        return (self.lam, *self.center, *self.cut, float(self.rule.kind == "cutmix"))

    def parts(self, inverse: bool = True, params: bool = True
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(perm, inverse perm, float64 params) as host tensors new to this call (None for parts left out);
        params (6,) for a whole-batch draw, (6, B) per sample (a batch of one: its one (6,) column, as
        ``transfer.unpack_draw`` reads it)."""
        inv = inverse_permutation(self.perm) if inverse else None
        if not params:
            return self.perm, inv, None
        if self.samples is None:
            return self.perm, inv, self.params()
        return self.perm, inv, self.samples if self.samples.shape[1] != 1 else self.samples.view(-1)

    def packed(self, inverse: bool = True, params: bool = True) -> torch.Tensor:
        """The draw as one host int64 tensor: ``[perm, inverse perm, float64 bits of params]`` (parts optional)."""
        return self.pack(self.parts(inverse, params))

    @staticmethod
    def pack(parts: Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]) -> torch.Tensor:
        """``parts`` as one int64 tensor (``transfer.unpack_draw`` reads it back)."""
        perm, inv, params = parts
        if inv is None and params is None:
            return perm
        tail = [] if params is None else [(params if params.dim() == 1 else params.flatten()).view(torch.int64)]
        return torch.cat(([perm] if inv is None else [perm, inv]) + tail)


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


def _check_choice(value: object, name: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(v) for v in choices)}; got {value!r}")
    return value


def _check_minmax(value: object) -> Optional[Tuple[float, float]]:
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if ok:
        lo, hi = (check_real(v, "cutmix_minmax", 0.0, 1.0) for v in value)
        ok = lo < hi
    if not ok:
        raise ValueError(f"cutmix_minmax must be None or (min, max) fractions of each side with 0 <= min < max <= 1, "
                         f"got {value!r}")
    return lo, hi


class MixSampler:
    """Draws one ``MixDraw`` per training batch; holds the only mutable state (the schedule step).

    All randomness comes from ``generator`` (a CPU ``torch.Generator``; torch's default CPU generator
    when None). The same number of values is drawn for every batch whatever the gate says, so two runs
    with the same seed that differ only in ``prob`` see the same lam/box/permutation stream. In a
    DataLoader worker a seeded generator is reseeded once from its seed and the worker's seed (which
    torch derives per worker and per epoch), so workers draw different, reproducible streams.

    Args:
        alpha: the Beta parameter of the kind's own lam (CutMix's for ``cutmix_or_mixup``).
        prob: the chance a batch is mixed (per sample in ``"elem"``/``"pair"`` modes).
        variant: the paper's Table 8 variant (``featmix.VARIANTS``).
        kind: ``"cutmix"``, ``"mixup"``, ``"cutout"`` or ``"cutmix_or_mixup"`` (CutMix with chance
            ``switch_prob``, else Mixup with ``mixup_alpha``, as timm's ``Mixup``).
        mode: ``"batch"`` (one draw for the batch), ``"elem"`` (per sample) or ``"pair"`` (per pair).
        mixup_alpha: Mixup's Beta parameter for ``cutmix_or_mixup``.
        switch_prob: the chance of CutMix over Mixup.
        cutout_size: Cutout's box side as a fraction of each side.
        cutmix_minmax: timm's box-side range as fractions of each side (replaces the Beta draw).
        correct_lam: CutMix's label weight is the pasted area (True) or the drawn lam.
        total_steps: the schedule's length for ``variant="scheduled"``.
        center_std: the box centre's std for ``variant="center_gaussian"``.
        generator: a CPU ``torch.Generator``, or None for torch's default generator.

    Raises:
        ValueError: a value out of range or a kind/variant pair that does not fit (named in the message).
        TypeError: a generator that is not a ``torch.Generator``.

    Example:
        >>> sampler = featmix.MixSampler(alpha=1.0, generator=torch.Generator().manual_seed(0))
        >>> draw = sampler.draw(batch_size=4)
        >>> draw.perm.shape, 0.0 <= draw.lam <= 1.0, draw.place(8, 8).grid
        (torch.Size([4]), True, (8, 8))
    """

    def __init__(self, alpha: float = 1.0, prob: float = 1.0, variant: str = "cutmix", *, kind: str = "cutmix",
                 mode: str = "batch", mixup_alpha: float = 1.0, switch_prob: float = 0.5, cutout_size: float = 0.5,
                 cutmix_minmax: Optional[Tuple[float, float]] = None, correct_lam: bool = True,
                 total_steps: Optional[int] = None, center_std: float = 0.25,
                 generator: Optional[torch.Generator] = None) -> None:
        self.variant = variant
        self.total_steps = total_steps
        if self.variant == "scheduled" and self.total_steps is None:
            raise ValueError("variant='scheduled' needs total_steps= (an int > 0: the number of training "
                             "steps over which prob ramps from 0 to its value)")
        self.kind = _check_choice(kind, "kind", KINDS)
        self.mode = _check_choice(mode, "mode", MODES)
        self._check_kind_fits_variant()
        self.alpha = alpha
        self.mixup_alpha = mixup_alpha
        self.prob = prob
        self.switch_prob = check_real(switch_prob, "switch_prob", 0.0, 1.0, meaning="chance of CutMix over Mixup")
        self.cutout_size = check_real(cutout_size, "cutout_size", 0.0, 1.0, low_open=True,
                                      meaning="Cutout box side as a fraction of each side")
        self.cutmix_minmax = _check_minmax(cutmix_minmax)
        self.correct_lam = check_flag(correct_lam, "correct_lam")
        self.center_std = center_std
        self.generator = check_generator(generator)
        self.step = 0  # batches drawn so far: drives variant="scheduled"
        self._reseeded_for: Optional[int] = None  # the DataLoader worker seed this copy was reseeded for
        self._rules = {k: Rule(k, self.correct_lam, self.cutmix_minmax if k == "cutmix" else None)
                       for k in ("cutmix", "mixup", "cutout")}  # fixed objects: compiled graphs guard on them
        self._rule = self._rules["cutmix" if self.kind == "cutmix_or_mixup" else self.kind]
        # a batch smaller than this trains unmixed: kinds with a partner need two samples, Cutout one
        self._min_batch = 1 if kind_of(self.kind).needs_partner else 0

    def _check_kind_fits_variant(self) -> None:
        if self.kind == "mixup" and self.variant in _BOX_VARIANTS:
            raise ValueError(f"variant={self.variant!r} places a box, and kind='mixup' has none: use kind='cutmix' "
                             f"or 'cutmix_or_mixup', or a label/schedule variant")
        if self.kind == "cutout" and self.variant in ("one_hot", "complete_label", "fixed_size"):
            raise ValueError(f"variant={self.variant!r} changes the box size or the labels, and kind='cutout' has a "
                             f"fixed box (cutout_size=) and keeps the labels")

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_real(value, "alpha", 0.0, math.inf, low_open=True, meaning="lam ~ Beta(alpha, alpha)")
        self._conc = torch.full((2,), self._alpha, dtype=torch.float64)  # Beta(a, a) as Dirichlet(a, a)

    @property
    def mixup_alpha(self) -> float:
        return self._mixup_alpha

    @mixup_alpha.setter
    def mixup_alpha(self, value: float) -> None:
        self._mixup_alpha = check_real(value, "mixup_alpha", 0.0, math.inf, low_open=True,
                                       meaning="Mixup's lam ~ Beta(mixup_alpha, mixup_alpha)")

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
        self._variant = _check_choice(value, "variant", VARIANTS)

    @property
    def total_steps(self) -> Optional[int]:
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: Optional[int]) -> None:
        self._total_steps = None if value is None else check_int(value, "total_steps", 1, "the schedule's length")

    def current_prob(self) -> float:
        """The gate probability for the next batch (ramps linearly for variant='scheduled')."""
        if self._variant == "scheduled":
            return self._prob * min(1.0, self.step / float(self._total_steps))
        return self._prob

    def draw(self, batch_size: int, num_sites: int = 1) -> MixDraw:
        """Draw gate, lam, centre, permutation and site for one batch.

        Args:
            batch_size: the samples in the batch.
            num_sites: the candidate mixing sites; one is chosen uniformly.

        Returns:
            The ``MixDraw`` of the batch (``mixed`` False: it trains unmixed).
        """
        g = self._stream()
        p = self.current_prob()
        self.step += 1
        variant = self._variant
        u = torch.rand(5, generator=g, dtype=torch.float64).tolist()  # gate, centre y, x, site, lam
        lam = self._beta(g, u[4], self._alpha, self._conc)
        perm = torch.randperm(batch_size, generator=g)
        center = self._center(u[1], u[2], g)
        if variant == "fixed_size":
            lam = 0.75
        site = min(int(u[3] * num_sites), num_sites - 1)
        mixed = u[0] < p and batch_size > self._min_batch
        draw = MixDraw(mixed, lam, center, perm, site, variant, self._rule)
        if self.mode != "batch":
            return self._per_sample(draw, batch_size, p, g)
        if self.kind == "cutmix" and self.cutmix_minmax is None:
            return draw  # the paper's draw: nothing more
        return self._batch_extras(draw, g)

    def _batch_extras(self, draw: MixDraw, g: Optional[torch.Generator]) -> MixDraw:
        """Cutout's size, cutmix_minmax's uniforms and the per-batch CutMix-or-Mixup switch."""
        if self.kind == "cutout":
            return draw._replace(cut=(self.cutout_size, self.cutout_size))
        if self.kind == "mixup":
            return draw
        v = torch.rand(4, generator=g, dtype=torch.float64).tolist()  # switch, cut h, cut w, Mixup's lam
        if self.kind == "cutmix_or_mixup" and not v[0] < self.switch_prob:
            lam = self._beta(g, v[3], self._mixup_alpha, None)
            return draw._replace(lam=lam, rule=self._rules["mixup"])
        return draw._replace(cut=(v[1], v[2]))

    def _per_sample(self, draw: MixDraw, batch: int, p: float, g: Optional[torch.Generator]) -> MixDraw:
        """Per-sample gate, lam, centre, cut and kind (``mode='elem'``/``'pair'``), as float64 (6, B)."""
        # rows LAM, CY, CX, CUT_H, CUT_W start as the uniforms themselves (no copy); row IS_CUT holds the
        # switch's uniform until Mixup's lam has read it
        rows = torch.rand(6, batch, generator=g, dtype=torch.float64)  # lam, y, x, cut h, cut w, switch
        if self._alpha != 1.0:
            rows[LAM] = self._beta_vec(g, rows[LAM], self._alpha)
        if self.variant == "center_gaussian":
            rows[CY], rows[CX] = self._center_vec(rows[CY], rows[CX], g)
        if self.kind == "cutmix_or_mixup":
            is_cut = torch.rand(batch, generator=g, dtype=torch.float64) < self.switch_prob
            rows[LAM] = torch.where(is_cut, rows[LAM], self._beta_vec(g, rows[IS_CUT], self._mixup_alpha))
            rows[IS_CUT] = is_cut
        else:
            rows[IS_CUT].fill_(float(self.kind != "mixup"))
        if self.variant == "fixed_size":
            rows[LAM] = 0.75
        u = torch.rand(batch, generator=g, dtype=torch.float64)  # the gate: sample i mixes when u[i] < p
        everyone = p >= 1.0  # u < 1: every sample mixes
        perm = draw.perm
        if self.mode == "pair":  # both members of a pair take the first member's column and gate
            perm, lead = _pairing(draw.perm)
            rows = rows.index_select(1, lead)
            u = u if everyone else u.index_select(0, lead)
        off = None if everyone else u >= p
        if off is not None:
            rows[LAM].masked_fill_(off, 1.0)  # an unmixed sample keeps itself
        if self.kind == "cutout":
            rows[CUT_H] = rows[CUT_W] = self.cutout_size if off is None else torch.where(off, 0.0, self.cutout_size)
        return draw._replace(perm=perm, samples=rows, per_sample_kind=self.kind == "cutmix_or_mixup",
                        mixed=batch > self._min_batch and (everyone or u.min().item() < p))

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

    def _center_vec(self, uy: torch.Tensor, ux: torch.Tensor, g: Optional[torch.Generator]):
        if self.variant == "center_gaussian":
            z = torch.randn(2, uy.numel(), generator=g, dtype=torch.float64)
            c = (0.5 + self.center_std * z).clamp(0.0, math.nextafter(1.0, 0.0))
            return c[0], c[1]
        return uy, ux

    @staticmethod
    def _beta(g: Optional[torch.Generator], u: float, alpha: float, conc: Optional[torch.Tensor]) -> float:
        # Beta(1, 1) is Uniform(0, 1): the paper's alpha = 1 takes the uniform already drawn. Otherwise
        # Beta(a, a) is the first coordinate of Dirichlet(a, a): torch.distributions.Beta takes no
        # generator, the Dirichlet kernel does (and handles small alpha without 0/0).
        if alpha == 1.0:
            return u
        if conc is None:
            conc = torch.full((2,), alpha, dtype=torch.float64)
        return torch._sample_dirichlet(conc, generator=g).tolist()[0]

    @staticmethod
    def _beta_vec(g: Optional[torch.Generator], u: torch.Tensor, alpha: float) -> torch.Tensor:
        if alpha == 1.0:
            return u
        conc = torch.full((u.numel(), 2), alpha, dtype=torch.float64)
        return torch._sample_dirichlet(conc, generator=g)[:, 0]

    def state_dict(self) -> dict:
        """The draw state: the batches drawn (``variant="scheduled"``) and the generator's state.

        Returns:
            ``{"step": int, "generator": ByteTensor or None}`` (None when drawing from torch's default
            generator, whose state belongs to the caller).
        """
        gen = self.generator
        return {"step": self.step, "generator": None if gen is None else gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the draw stream where ``state`` (from ``state_dict``) left it.

        Raises:
            ValueError: ``state`` holds a generator state and this sampler has no generator.
        """
        self.step = int(state["step"])
        gen_state = state.get("generator")
        if gen_state is not None:
            if self.generator is None:
                raise ValueError("the state holds a generator state, but this sampler draws from torch's default "
                                 "generator: pass generator=torch.Generator() to resume its stream")
            self.generator.set_state(gen_state)

    def __repr__(self) -> str:
        extra = f", total_steps={self.total_steps}" if self.total_steps else ""
        kind = f", kind={self.kind!r}" if self.kind != "cutmix" else ""
        mode = f", mode={self.mode!r}" if self.mode != "batch" else ""
        return (f"MixSampler(alpha={self.alpha}, prob={self.prob}, variant={self.variant!r}{kind}{mode}{extra}, "
                f"step={self.step})")


def _pairing(order: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A permutation that swaps the samples ``order[0], order[1]``, ``order[2], order[3]``, ... (an odd one
    out keeps itself), and each sample's pair leader (``order[2k]`` for both ``order[2k]`` and ``order[2k + 1]``).

    Args:
        order: an int64 permutation (B,).

    Returns:
        ``(perm, lead)``, int64 (B,) each.
    """
    n = len(order)
    positions = _PAIR_POSITIONS.get(n)
    if positions is None:
        if len(_PAIR_POSITIONS) > 64:
            _PAIR_POSITIONS.clear()
        k = torch.arange(n)
        partner = k ^ 1
        if n % 2:
            partner[-1] = n - 1  # the odd one out keeps itself
        positions = _PAIR_POSITIONS[n] = torch.cat((partner, k - k % 2))
    out = torch.empty(2, n, dtype=order.dtype, device=order.device)
    out.index_copy_(1, order, order.index_select(0, positions).view(2, n))  # out[:, order[k]] = order[pos[:, k]]
    return out[0], out[1]


# batch size -> int64 (2B,): the position in the order of each position's partner, then of its pair leader
_PAIR_POSITIONS: dict = {}
