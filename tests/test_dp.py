"""Tests for the differential-privacy core (DESIGN.md section 7).

Calibration is checked against OpenDP itself; the noise recipe is checked statistically against
the exact discrete-Laplace law (and against OpenDP's own sampler); masking is checked with real
X25519 identities. Statistical tests use fixed seeds, passed explicitly, so they are reproducible;
their tolerances come from the sampling distribution (5 standard errors unless stated), so a
correct implementation fails with probability well under 1e-5 per check and the fixed seed makes
the outcome deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import opendp.prelude as dp_lib
import pytest
from opendp.accuracy import discrete_laplacian_scale_to_accuracy

from tessera import dp
from tessera.crypto import Identity, PublicIdentity
from tessera.errors import InvalidInput, Refused

CELLS = 4000 * 50  # "4000 rounds of 50 cells": cells are i.i.d., so one long vector per share
Z = 5.0  # tolerance in standard errors


def rng(seed: int) -> dp.Rng:
    return np.random.default_rng(seed)


def summed_shares(
    n: int, threshold: int, scale: float, seed: int, cells: int = CELLS
) -> np.ndarray:
    """The noise in a round's total: n participants' shares summed cell by cell."""
    generator = rng(seed)
    total = np.zeros(cells, dtype=np.int64)
    for _ in range(n):
        total += np.asarray(dp.noise_share(cells, scale, threshold, generator), dtype=np.int64)
    return total


def p_of(scale: float) -> float:
    return math.exp(-1.0 / scale)


def discrete_laplace_pmf(k: int, scale: float) -> float:
    p = p_of(scale)
    return (1 - p) / (1 + p) * p ** abs(k)


def variance_tolerance(n: int, threshold: int, scale: float, samples: int) -> float:
    """Z standard errors of the sample variance of NegBin(r, p) - NegBin(r, p), r = n/t.

    Cumulants of NegBin(r, p): k2 = r p / (1-p)^2, k4 = r p (1 + 4p + p^2) / (1-p)^4; the
    difference has twice the even ones. Var(sample variance) ~ (k4 + 2 k2^2) / samples.
    """
    p, r = p_of(scale), n / threshold
    k2 = 2 * r * p / (1 - p) ** 2
    k4 = 2 * r * p * (1 + 4 * p + p * p) / (1 - p) ** 4
    return Z * math.sqrt((k4 + 2 * k2 * k2) / samples)


def chi_square_p_value(statistic: float, df: int) -> float:
    """Upper tail of chi-square(df), Wilson-Hilferty normal approximation (good for df >= 10)."""
    z = ((statistic / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


# --- calibration against OpenDP --------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("sensitivity", [1, 3])
def test_epsilon_round_trips_through_opendp_privacy_map(epsilon: float, sensitivity: int) -> None:
    scale = dp.scale_for(epsilon, sensitivity)
    assert scale == pytest.approx(sensitivity / epsilon)
    assert dp.epsilon_for(scale, sensitivity) == pytest.approx(epsilon, rel=1e-9)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 7.5, 40.0])
@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_central_accuracy_is_opendp(scale: float, alpha: float) -> None:
    assert dp.central_accuracy(scale, alpha) == discrete_laplacian_scale_to_accuracy(scale, alpha)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 7.5, 40.0])
@pytest.mark.parametrize("alpha", [0.1, 0.05, 0.01])
@pytest.mark.parametrize("threshold", [1, 3, 7])
def test_exact_accuracy_for_threshold_participants_matches_opendp(
    scale: float, alpha: float, threshold: int
) -> None:
    """n = t shares are the discrete Laplace: the exact interval is OpenDP's, floored.

    OpenDP's a solves alpha = 2 p^a / (1 + p) (the real extension of P(|X| >= k)); the exact
    integer half-width is the least k with P(|X| > k) <= alpha, which is floor(a) (or a - 1 in the
    measure-zero case where a is an integer).
    """
    exact = dp.sum_accuracy(threshold, threshold, scale, alpha)
    opendp = dp.central_accuracy(scale, alpha)
    assert exact == math.floor(opendp) or exact == opendp - 1
    p = p_of(scale)
    for k in (0, 1, int(exact)):
        closed_form = 2 * p ** (k + 1) / (1 + p)  # P(|X| > k) for the discrete Laplace
        assert dp.tail_probability(threshold, threshold, scale, k) == pytest.approx(
            closed_form, rel=1e-9, abs=1e-13
        )


def test_accuracy_grows_with_participants_above_threshold() -> None:
    widths = [dp.sum_accuracy(n, 3, 2.0, 0.05) for n in (3, 6, 12, 48)]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    with pytest.raises(Refused):
        dp.sum_accuracy(2, 3, 2.0, 0.05)


def test_noise_variance_formula() -> None:
    p = p_of(2.0)
    assert dp.noise_variance(3, 3, 2.0) == pytest.approx(2 * p / (1 - p) ** 2)
    assert dp.noise_variance(9, 3, 2.0) == pytest.approx(3 * 2 * p / (1 - p) ** 2)


# --- the noise recipe, statistically -------------------------------------------------------


@pytest.mark.parametrize(("n", "threshold", "scale"), [(3, 3, 2.0), (9, 3, 2.0), (5, 5, 0.8)])
def test_summed_shares_mean_and_variance(n: int, threshold: int, scale: float) -> None:
    """t shares give the discrete-Laplace variance 2p/(1-p)^2; n = 3t give three times it."""
    noise = summed_shares(n, threshold, scale, seed=11 + n)
    expected = dp.noise_variance(n, threshold, scale)
    assert abs(noise.mean()) < Z * math.sqrt(expected / noise.size)
    variance = float(noise.var())
    assert abs(variance - expected) < variance_tolerance(n, threshold, scale, noise.size)
    print(f"n={n} t={threshold} s={scale}: variance ratio {variance / expected:.4f}")


@pytest.mark.parametrize("scale", [0.7, 2.0, 5.0])
def test_summed_shares_fit_the_discrete_laplace(scale: float) -> None:
    """Goodness of fit of t = 4 summed shares to the exact pmf (1-p)/(1+p) p^|k|.

    Chi-square over the values whose expected count is at least 20, the two tails pooled; the
    p-value must exceed 1e-4. Also the Dvoretzky-Kiefer-Wolfowitz bound on the CDF:
    sup |F_n - F| <= sqrt(ln(2/1e-6) / (2N)) fails with probability at most 1e-6.
    """
    noise = summed_shares(4, 4, scale, seed=int(scale * 100))
    size = noise.size
    p = p_of(scale)
    k_max = 0
    while size * discrete_laplace_pmf(k_max + 1, scale) >= 20:
        k_max += 1
    values, counts = np.unique(noise, return_counts=True)
    observed = dict(zip(values.tolist(), counts.tolist(), strict=True))
    statistic = 0.0
    for k in range(-k_max, k_max + 1):
        expected = size * discrete_laplace_pmf(k, scale)
        statistic += (observed.get(k, 0) - expected) ** 2 / expected
    tail_expected = size * p ** (k_max + 1) / (1 + p)  # P(X > k_max) = P(X < -k_max)
    for observed_tail in (int((noise > k_max).sum()), int((noise < -k_max).sum())):
        statistic += (observed_tail - tail_expected) ** 2 / tail_expected
    df = 2 * k_max + 2  # 2 k_max + 3 bins, less one for the fixed total
    p_value = chi_square_p_value(statistic, df) if df >= 10 else math.exp(-statistic / 2)
    print(f"s={scale}: chi-square {statistic:.1f} on {df} df, p = {p_value:.3g}")
    assert p_value > 1e-4

    ks = np.arange(-5 * k_max - 5, 5 * k_max + 6)
    cdf = np.cumsum([discrete_laplace_pmf(int(k), scale) for k in ks])
    cdf[0] += p ** (-ks[0]) / (1 + p) - discrete_laplace_pmf(int(ks[0]), scale)  # P(X <= ks[0])
    empirical = np.searchsorted(np.sort(noise), ks, side="right") / size
    assert float(np.max(np.abs(empirical - cdf))) < math.sqrt(math.log(2 / 1e-6) / (2 * size))


@pytest.mark.parametrize(
    ("n", "threshold", "scale", "alpha"), [(5, 3, 3.0, 0.1), (4, 4, 1.5, 0.05)]
)
def test_interval_coverage(n: int, threshold: int, scale: float, alpha: float) -> None:
    """Empirical coverage of [v - a, v + a] is the exact coverage (>= 1 - alpha), within Z SE."""
    accuracy = dp.sum_accuracy(n, threshold, scale, alpha)
    noise = summed_shares(n, threshold, scale, seed=7 * n + threshold)
    exact = 1 - dp.tail_probability(n, threshold, scale, int(accuracy))
    assert exact >= 1 - alpha
    coverage = float(np.mean(np.abs(noise) <= accuracy))
    assert abs(coverage - exact) < Z * math.sqrt(exact * (1 - exact) / noise.size)
    print(f"n={n} t={threshold} alpha={alpha}: coverage {coverage:.4f}, exact {exact:.4f}")


def test_private_round_error_matches_central_mechanism() -> None:
    """The issue's check: with n = t participants the error is within 1.2x the central one.

    The central mechanism is OpenDP's own make_laplace sampler on an integer vector.
    """
    scale, threshold, cells = 2.0, 5, 50_000
    measure = dp_lib.m.make_laplace(
        dp_lib.vector_domain(dp_lib.atom_domain(T=int)), dp_lib.l1_distance(T=int), scale=scale
    )
    central = np.asarray(measure([0] * cells), dtype=np.float64)
    private = summed_shares(threshold, threshold, scale, seed=5, cells=cells).astype(np.float64)
    ratio = math.sqrt(np.mean(private**2)) / math.sqrt(np.mean(central**2))
    print(f"private / central RMSE: {ratio:.4f}")
    assert 1 / 1.2 < ratio < 1.2
    assert dp.sum_accuracy(threshold, threshold, scale, 0.05) <= 1.2 * dp.central_accuracy(
        scale, 0.05
    )


def test_local_noise_error_grows_with_square_root_of_nodes() -> None:
    """Each node adding the full noise: the total's RMSE doubles per 4x nodes (within 5%)."""
    scale, cells = 2.0, 20_000
    generator = rng(99)
    rmse = {}
    for nodes in (4, 16, 64):
        total = np.zeros(cells, dtype=np.int64)
        for _ in range(nodes):
            total += np.asarray(dp.local_noise(cells, scale, generator), dtype=np.int64)
        rmse[nodes] = math.sqrt(float(np.mean(total.astype(np.float64) ** 2)))
        expected = math.sqrt(dp.noise_variance(nodes, 1, scale))
        assert rmse[nodes] == pytest.approx(expected, rel=0.05)
    ratios = (rmse[16] / rmse[4], rmse[64] / rmse[16])
    print(f"local-noise RMSE ratios per 4x nodes: {ratios[0]:.3f}, {ratios[1]:.3f}")
    assert all(abs(r - 2) < 0.1 for r in ratios)
    private_rmse = math.sqrt(dp.noise_variance(64, 64, scale))
    assert rmse[64] / private_rmse == pytest.approx(8, rel=0.05)


def test_new_rng_is_fresh_each_time() -> None:
    first, second = dp.new_rng(), dp.new_rng()
    assert dp.noise_share(64, 10.0, 3, first) != dp.noise_share(64, 10.0, 3, second)
    assert rng(1).integers(0, 2**62, 8).tolist() == rng(1).integers(0, 2**62, 8).tolist()


# --- tables ------------------------------------------------------------------------------------


def test_default_needs_table_layout() -> None:
    spec = dp.default_needs_table(contribution_bound=2)
    assert spec.size == 18 * 6 == len(spec.cells)
    assert spec.cells[0] == ("safe_housing", "identified")
    assert spec.cells[1] == ("safe_housing", "referred")  # last dimension fastest
    assert spec.cells[6] == ("basic_needs", "identified")
    assert all(spec.index(c) == i for i, c in enumerate(spec.cells))
    assert dp.l1_sensitivity(spec) == 2
    with pytest.raises(InvalidInput):
        spec.index(("safe_housing", "nonsense"))


def test_bounded_counts_caps_each_survivor_and_drops_at_random() -> None:
    spec = dp.default_needs_table(contribution_bound=2)
    greedy = [("medical", "unmet"), ("safe_housing", "met"), ("legal_civil", "referred")]
    records = [greedy, [("medical", "unmet"), ("medical", "unmet")], [], [("medical", "unmet")]]
    counts = dp.bounded_counts(records, spec, np.random.default_rng(1))
    assert sum(counts) == 2 + 1 + 0 + 1  # the greedy record keeps 2 of its 3 cells
    assert all(c in (0, 1, 2, 3) for c in counts)
    # Which two cells it keeps is uniform: over many draws each of the three is kept 2/3 of the
    # time (category order no longer decides; the old rule always dropped legal_civil).
    rng = np.random.default_rng(2)
    kept = np.zeros(spec.size)
    draws = 3000
    for _ in range(draws):
        kept += dp.bounded_counts([greedy], spec, rng)
    for cell in greedy:
        share = kept[spec.index(cell)] / draws
        assert abs(share - 2 / 3) < 5 * math.sqrt(2 / 9 / draws), (cell, share)


def test_contribution_histogram_counts_each_survivor_once() -> None:
    spec = dp.default_needs_table(contribution_bound=1)
    bins = dp.histogram_bins(spec)
    assert bins == 18  # one status per category: at most 18 cells per record
    records = [
        [("medical", "unmet")],
        [("medical", "unmet"), ("medical", "unmet")],  # duplicates collapse: one cell
        [("medical", "unmet"), ("safe_housing", "met"), ("legal_civil", "referred")],
        [],
    ]
    assert dp.contribution_histogram(records, spec, bins) == [2, 0, 1] + [0] * 15
    # Adding or removing one record moves exactly one bin by one (L1 sensitivity 1).
    assert sum(dp.contribution_histogram(records[2:3], spec, bins)) == 1
    # The last bin counts every larger record.
    assert dp.contribution_histogram(records[2:3], spec, 2) == [0, 1]


def test_bound_report_sizes_the_bound_from_significant_bins() -> None:
    # 100 survivors each with 1..6 cells, noiseless: bound 6 drops nothing, 5 drops 100 of 2100.
    histogram = [100] * 6 + [0] * 12
    assert dp.bound_report(histogram, 10.0, 6) == (0.0, 6)
    dropped, suggested = dp.bound_report(histogram, 10.0, 5)
    assert dropped == pytest.approx(100 / 2100) and suggested == 6
    # Noise in empty bins below the significance line does not push the bound up.
    noisy = [103, 95, 99, 101, 98, 104, 9, -4, 7, 0, 3, -8, 5, 9, 2, -1, 6, 8]
    assert dp.bound_report(noisy, 10.0, 6)[1] == 6
    # A small tail under 1% of contributions is left to the bound.
    tail = [1000, 1000, 0, 5]  # bound 2 drops 10 of 3020 contributions
    assert dp.bound_report(tail, 3.0, 2, floor=1) == (pytest.approx(10 / 3020), 2)
    larger = [300, 300, 0, 0, 0, 0, 0, 0, 5]  # bound 2 would drop 35 of 945: 8 drops 5
    assert dp.bound_report(larger, 3.0, 2, floor=1)[1] == 8
    # The histogram raises the bound but never lowers it below the floor (the default).
    assert dp.bound_report(tail + [0] * 14, 3.0, 6) == (0.0, dp.DEFAULT_BOUND)
    assert dp.bound_report(tail, 3.0, 4) == (0.0, 4)  # no bound above the histogram's bins
    assert dp.bound_report([0] * 18, 3.0, 6) == (0.0, 0)


def test_default_threshold_keeps_the_error_within_the_ratio() -> None:
    for n in range(2, 400):
        t = dp.default_threshold(n)
        assert 2 <= t <= n
        assert math.sqrt(n / t) <= dp.MAX_ERROR_RATIO + 1e-12
        # and it is the least such threshold (more would tolerate fewer colluders)
        assert t == 2 or math.sqrt(n / (t - 1)) > dp.MAX_ERROR_RATIO


def test_release_and_post_processing() -> None:
    spec = dp.TableSpec("t", (("a", ("x", "y")), ("b", ("u", "v", "w"))), 1)
    values = [5, -3, 0, 2, 1, -1]
    accuracy = dp.sum_accuracy(4, 3, 2.0, 0.05)
    cells = dp.release_cells(values, spec, 4, 3, 2.0, 0.05)
    assert cells[1] == (("x", "v"), -3, -3 - accuracy, -3 + accuracy)
    assert dp.clamp_nonnegative(values) == [5, 0, 0, 2, 1, 0]
    summed, totals = dp.sum_over(values, spec, "a")
    assert summed.dimensions == (("b", ("u", "v", "w")),)
    assert totals == [7, -2, -1]
    _, by_a = dp.sum_over(values, spec, "b")
    assert by_a == [2, 2]
    assert dp.describe_mechanism(5, 3, 2.0) == (
        "discrete Laplace, scale 2.0, as the sum of 5 NegBin share differences (threshold 3)"
    )


# --- masking -----------------------------------------------------------------------------------


def participants(count: int) -> tuple[list[Identity], list[tuple[str, PublicIdentity]]]:
    identities = [Identity.generate() for _ in range(count)]
    listed = [(f"agency-{i:02d}", identity.public) for i, identity in enumerate(identities)]
    return identities, listed


@pytest.mark.parametrize("count", [3, 5])
def test_pair_masks_cancel_and_round_sums_exactly(count: int) -> None:
    identities, listed = participants(count)
    spec = dp.default_needs_table()
    masks = [
        dp.pair_masks(identity, i, listed, "round-1", 1, spec.size)
        for i, identity in enumerate(identities)
    ]
    assert all(sum(column) % dp.MODULUS == 0 for column in zip(*masks, strict=True))

    generator = rng(count)
    counts = [[int(c) for c in generator.integers(0, 30, spec.size)] for _ in range(count)]
    noisy = [
        [c + e for c, e in zip(row, dp.noise_share(spec.size, 2.0, 3, generator), strict=True)]
        for row in counts
    ]
    shares = [dp.mask_share(row, [mask]) for row, mask in zip(noisy, masks, strict=True)]
    for share, row in zip(shares, noisy, strict=True):
        assert all(0 <= v < dp.MODULUS for v in share)
        assert share != [v % dp.MODULUS for v in row]  # the share hides counts plus noise
    assert dp.unmask_sum(shares) == [sum(column) for column in zip(*noisy, strict=True)]


def test_masks_are_fresh_per_round_and_attempt() -> None:
    identities, listed = participants(3)
    values = [4, 0, 7]

    def share(round_id: str, attempt: int) -> list[int]:
        mask = dp.pair_masks(identities[1], 1, listed, round_id, attempt, 3)
        return dp.mask_share(values, [mask])

    assert len({tuple(share(r, a)) for r in ("r1", "r2") for a in (1, 2)}) == 4
    assert share("r1", 1) == share("r1", 1)  # deterministic for the same round and attempt


def test_unmask_reads_negative_totals() -> None:
    mask = [12345678901234567890, 3]
    first = dp.mask_share([-3, 2**63 - 1], [mask])
    second = dp.mask_share([0, -(2**63)], masks_to_subtract=[mask])
    assert dp.unmask_sum([first, second]) == [-3, -1]
    assert dp.unmask_sum([dp.mask_share([-3, 5])]) == [-3, 5]
    with pytest.raises(InvalidInput):
        dp.mask_share([2**63])


def test_pair_masks_refuse_bad_participant_lists() -> None:
    identities, listed = participants(3)
    with pytest.raises(InvalidInput):
        dp.pair_masks(identities[0], 0, list(reversed(listed)), "r", 1, 4)
    with pytest.raises(InvalidInput):
        dp.pair_masks(identities[0], 1, listed, "r", 1, 4)


def _gaussian_sigma(sensitivity_l2: float, epsilon: float, delta: float) -> float:
    """OpenDP: the least Gaussian scale whose zCDP, converted to (ε, δ), meets the target."""
    import opendp.prelude as odp
    from opendp.mod import binary_search_param

    odp.enable_features("contrib")
    domain = odp.vector_domain(odp.atom_domain(T=float, nan=False))
    metric = odp.l2_distance(T=float)

    def measurement(scale: float) -> object:
        gaussian = odp.m.make_gaussian(domain, metric, scale=scale)
        return odp.c.make_fix_delta(odp.c.make_zCDP_to_approxDP(gaussian), delta)

    return float(binary_search_param(measurement, d_in=sensitivity_l2, d_out=(epsilon, delta)))


def test_l1_noise_beats_an_l2_design_at_the_default_bound() -> None:
    """docs/privacy.md's choice, computed: with bound k a record moves k cells by 1, so L1 = k
    and L2 = √k. At the table's ε (0.8 of a round of ε = 1) the discrete Laplace of scale k / ε
    has less noise than the Gaussian that OpenDP calibrates to (ε, δ = 1e-6) for L2 = √k while
    k ≤ 9; from k = 10 the Gaussian would win. The default bound is 6."""
    epsilon, delta = 0.8, 1e-6

    def laplace_sd(k: int) -> float:
        return math.sqrt(dp.noise_variance(1, 1, dp.scale_for(epsilon, k)))

    ratios = {k: laplace_sd(k) / _gaussian_sigma(math.sqrt(k), epsilon, delta) for k in (6, 9, 10)}
    assert ratios[dp.DEFAULT_BOUND] < 0.8  # about 0.78: 22% less noise
    assert ratios[9] < 1 < ratios[10] + 0.01  # the crossover
