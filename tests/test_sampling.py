"""The per-batch draw: the box rule against a simulation of the reference code, and the variants."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import featmix
from featmix import MixSampler, box_on_grid
from tests.conftest import gen


def reference_box(lam: float, cy: int, cx: int, H: int, W: int):
    """The reference code's rand_bbox with the centre given (it draws cx, cy with randint)."""
    cut_rat = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(H * cut_rat), int(W * cut_rat)
    y1, y2 = np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H)
    x1, x2 = np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W)
    return int(y1), int(y2), int(x1), int(x2)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


@pytest.mark.parametrize("H,W", [(32, 32), (7, 7), (28, 20)])
def test_box_matches_reference_rule_for_every_centre(H, W):
    rng = np.random.default_rng(0)
    for lam in list(rng.uniform(0, 1, 40)) + [0.0, 0.25, 0.5, 0.75, 1.0]:
        for cy in range(H):
            cx = int(rng.integers(0, W))
            # centre fractions that floor to the integer cell (cy, cx)
            box = box_on_grid(lam, ((cy + 0.5) / H, (cx + 0.5) / W), H, W)
            assert box == reference_box(lam, cy, cx, H, W)


def test_corrected_lam_distribution_matches_reference_simulation():
    """Our sampler vs numpy's simulation of the reference code: two-sample KS at alpha = 0.001."""
    n, H, W = 4000, 32, 32
    s = MixSampler(alpha=1.0, generator=gen(1))
    ours = []
    for _ in range(n):
        d = s.draw(2)
        y1, y2, x1, x2 = d.box_on_grid(H, W)
        ours.append(1 - (y2 - y1) * (x2 - x1) / (H * W))
    rng = np.random.default_rng(2)
    ref = []
    for _ in range(n):
        lam = rng.beta(1.0, 1.0)
        y1, y2, x1, x2 = reference_box(lam, int(rng.integers(0, H)), int(rng.integers(0, W)), H, W)
        ref.append(1 - (y2 - y1) * (x2 - x1) / (H * W))
    ours, ref = np.array(ours), np.array(ref)
    crit = 1.95 * math.sqrt(2.0 / n)  # KS critical value for alpha = 0.001
    assert ks_statistic(ours, ref) < crit
    se = math.sqrt(ours.var() / n + ref.var() / n)
    assert abs(ours.mean() - ref.mean()) < 4 * se
    # clipping makes the pasted area smaller than the drawn one: corrected lam > raw lam on average
    assert ours.mean() > 0.5 + 4 * ours.std() / math.sqrt(n)
    # on a 32 x 32 grid the corrected lam is a multiple of 1/1024
    assert np.allclose(np.round((1 - ours) * H * W), (1 - ours) * H * W)


def test_lam_is_beta_alpha_alpha():
    n = 4000
    for alpha in (0.25, 1.0, 4.0):  # 1.0 takes the uniform path, the others the Dirichlet kernel
        s = MixSampler(alpha=alpha, generator=gen(3))
        lams = np.array([s.draw(2).lam for _ in range(n)])
        mean, var = 0.5, 1.0 / (4 * (2 * alpha + 1))  # Beta(a, a)
        assert abs(lams.mean() - mean) < 4 * math.sqrt(var / n)
        assert abs(lams.var() - var) < 0.1 * var + 4 * math.sqrt(2 * var ** 2 / n)
        ref = np.random.default_rng(4).beta(alpha, alpha, n)
        assert ks_statistic(lams, ref) < 1.95 * math.sqrt(2.0 / n)


def test_alpha_can_be_changed_after_construction_and_is_validated():
    """alpha is a validated property: a new value changes the draw (here Beta(0.1, 0.1), mass near 0/1)."""
    s = MixSampler(alpha=1.0, generator=gen(12))
    s.alpha = 0.1
    lams = np.array([s.draw(2).lam for _ in range(2000)])
    # Beta(0.1, 0.1): P(0.1 < lam < 0.9) = 0.187 (against 0.8 for the uniform); 4 SE of a binomial
    p, inner = 0.187, np.mean((lams > 0.1) & (lams < 0.9))
    assert abs(inner - p) < 4 * math.sqrt(p * (1 - p) / 2000)
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="alpha must be a number > 0"):
            s.alpha = bad
    assert s.alpha == 0.1


def test_lam_is_uncorrelated_with_centre_and_gate():
    """lam, the centre and the gate come from one draw of uniforms: they must still be independent."""
    n = 4000
    for alpha in (1.0, 0.5):
        s = MixSampler(alpha=alpha, prob=0.5, generator=gen(11))
        draws = [s.draw(2) for _ in range(n)]
        lam = np.array([d.lam for d in draws])
        for other in (np.array([d.center[0] for d in draws]), np.array([d.center[1] for d in draws]),
                      np.array([float(d.mixed) for d in draws])):
            assert abs(np.corrcoef(lam, other)[0, 1]) < 4 / math.sqrt(n)  # 4 SE of a null correlation


def test_centre_is_uniform_over_integer_cells():
    n, H = 6400, 32
    s = MixSampler(generator=gen(5))
    counts = np.zeros(H)
    for _ in range(n):
        counts[min(int(s.draw(2).center[0] * H), H - 1)] += 1
    chi2 = ((counts - n / H) ** 2 / (n / H)).sum()
    assert chi2 < 61.1  # chi-square, 31 degrees of freedom, p = 0.001


def test_gate_probability_and_one_permutation_per_batch():
    n = 3000
    s = MixSampler(prob=0.3, generator=gen(6))
    draws = [s.draw(8) for _ in range(n)]
    rate = np.mean([d.mixed for d in draws])
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    for d in draws[:50]:
        assert sorted(d.perm.tolist()) == list(range(8))


def test_prob_extremes_and_batch_of_one():
    assert not any(MixSampler(prob=0.0, generator=gen(0)).draw(8).mixed for _ in range(200))
    assert all(MixSampler(prob=1.0, generator=gen(0)).draw(8).mixed for _ in range(200))
    assert not MixSampler(prob=1.0, generator=gen(0)).draw(1).mixed


def test_same_seed_same_draws_and_streams_aligned_across_prob():
    a = [MixSampler(prob=1.0, generator=gen(7)).draw(16) for _ in range(1)]
    s1, s2, s3 = MixSampler(prob=1.0, generator=gen(7)), MixSampler(prob=1.0, generator=gen(7)), \
        MixSampler(prob=0.5, generator=gen(7))
    for _ in range(20):
        d1, d2, d3 = s1.draw(16), s2.draw(16), s3.draw(16)
        assert d1.lam == d2.lam and d1.center == d2.center and torch.equal(d1.perm, d2.perm)
        # a different prob changes only the gate, never the lam/box/permutation stream
        assert d1.lam == d3.lam and torch.equal(d1.perm, d3.perm)
    assert a[0].lam == MixSampler(generator=gen(7)).draw(16).lam
    assert MixSampler(generator=gen(8)).draw(16).lam != a[0].lam


def test_site_choice_uniform():
    n, k = 12000, 4
    s = MixSampler(generator=gen(9))
    counts = np.bincount([s.draw(4, num_sites=k).site for _ in range(n)], minlength=k)
    chi2 = ((counts - n / k) ** 2 / (n / k)).sum()
    assert chi2 < 16.27  # 3 dof, p = 0.001


def test_fixed_size_box_is_half_sides_inside_grid():
    s = MixSampler(variant="fixed_size", generator=gen(10))
    tops = set()
    for _ in range(500):
        d = s.draw(4)
        where = d.place(32, 32)
        y1, y2, x1, x2 = where.box
        assert (y2 - y1, x2 - x1) == (16, 16) and 0 <= y1 and y2 <= 32 and 0 <= x1 and x2 <= 32
        assert where.lam == where.weight == 0.75
        tops.add(y1)
    assert tops == set(range(17))  # every placement that fits is reachable


def test_center_gaussian_concentrates_around_centre():
    n, std = 4000, 0.1
    s = MixSampler(variant="center_gaussian", center_std=std, generator=gen(11))
    cy = np.array([s.draw(2).center[0] for _ in range(n)])
    assert abs(cy.mean() - 0.5) < 4 * std / math.sqrt(n)
    assert abs(cy.std() - std) < 0.05 * std + 4 * std / math.sqrt(2 * n)


def test_scheduled_prob_ramps_linearly_and_resumes():
    total = 2000
    s = MixSampler(prob=1.0, variant="scheduled", total_steps=total, generator=gen(13))
    mixed = np.array([s.draw(4).mixed for _ in range(total + 500)], dtype=float)
    first, last, after = mixed[:400].mean(), mixed[1600:2000].mean(), mixed[total:].mean()
    # expected rates: mean of step/total over the window
    assert abs(first - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 400)
    assert abs(last - 0.9) < 4 * math.sqrt(0.1 * 0.9 / 400)
    assert after == 1.0
    state = s.state_dict()
    assert state["step"] == total + 500 and torch.equal(state["generator"], s.generator.get_state())
    s2 = MixSampler(prob=1.0, variant="scheduled", total_steps=total, generator=gen(0))
    s2.load_state_dict(state)
    assert s2.current_prob() == 1.0
    s3 = MixSampler(prob=0.5, variant="scheduled", total_steps=100)
    assert s3.current_prob() == 0.0
    s3.load_state_dict({"step": 50})
    assert s3.current_prob() == pytest.approx(0.25)


def test_one_hot_and_complete_label_weights():
    # lam = 0.75 and centre (0.25, 0.3125) on 32 x 32: cut 16 x 16 around (8, 10) -> box (0, 16, 2, 18), lam 0.75
    for variant, expected in (("cutmix", 0.75), ("one_hot", 1.0), ("complete_label", 0.5)):
        where = featmix.place(0.75, (0.25, 0.3125), 32, 32, variant)
        assert where.box == (0, 16, 2, 18) and where.lam == 0.75 and where.weight == expected
    # lam = 0.2: cut 28 x 28 around the middle -> 1 - 784/1024 = 0.234375: the partner covers the larger area
    assert featmix.place(0.2, (0.5, 0.5), 32, 32, "one_hot").weight == 0.0
    assert featmix.place(0.2, (0.5, 0.5), 32, 32, "cutmix").weight == 0.234375


def test_tensor_placement_is_the_twin_of_the_host_placement():
    """place_tensor (compiled path) gives the same box, lam and weight as place (eager path), every variant."""
    from featmix.kinds import place_tensor
    g = torch.Generator().manual_seed(5)
    for variant in featmix.VARIANTS:
        for _ in range(200):
            lam, cy, cx = torch.rand(3, generator=g, dtype=torch.float64).tolist()
            h, w = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
            host = featmix.place(lam, (cy, cx), h, w, variant)
            dev = place_tensor(torch.tensor([lam, cy, cx], dtype=torch.float64), h, w, variant)
            assert tuple(dev.box.tolist()) == host.box and dev.grid == host.grid
            assert float(dev.lam) == host.lam and float(dev.weight) == host.weight


def test_generator_must_be_a_cpu_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        MixSampler(generator=3)
    with pytest.raises(TypeError, match="generator"):
        MixSampler(generator=np.random.default_rng(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to build a CUDA generator")
def test_cuda_generator_rejected():
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        MixSampler(generator=torch.Generator(device="cuda"))
