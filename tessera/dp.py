"""Differential privacy core: tables, calibration, noise shares, accuracy, masking (DESIGN.md §7).

The guarantee. A release of a table with L1 sensitivity ``d`` (one survivor's record at one
agency changes at most ``d`` cells, each by 1, see :func:`bounded_counts`) whose total noise is the
discrete Laplace of scale ``s`` satisfies pure ε-differential privacy with ε as OpenDP's privacy
map of ``make_laplace`` (integer vector domain, L1 distance) computes it, that is ε = d / s. In a
private round the noise in the total is the sum of the participants' shares; with threshold ``t``
any ``t`` honest shares already sum to that discrete Laplace (more shares only add noise, which
post-processing cannot undo), so the broker, which sees only the masked shares and their sum,
learns no more than the central mechanism releases.

Noise recipe (section 7, exactly). With p = exp(-1/s), a discrete Laplace is G1 - G2 where each G is
NegBin(1, p), the number of failures before a success of probability 1 - p. NegBin(r, p) is
infinitely divisible, so each participant adds NegBin(1/t, p) - NegBin(1/t, p) to every cell, each
NegBin(r, p) drawn as Poisson(Gamma(shape r, scale p / (1 - p))). The sum of n shares is
NegBin(n/t, p) - NegBin(n/t, p): variance n/t · 2p / (1 - p)²; its interval is computed exactly by
:func:`sum_accuracy`. The sampler works in floating point (numpy's Gamma and Poisson); unlike
OpenDP's own samplers it is not exact bit for bit, which is why ``tests/test_dp.py`` checks the
summed noise against the exact distribution and against OpenDP's sampler.

Masking: cells are integers mod 2**64; counts plus noise are signed 64-bit values; participants
i < j add / subtract their pairwise mask (:func:`tessera.crypto.pairwise_mask`), so the masks cancel
in the sum, which is read back as signed 64-bit (:func:`unmask_sum`).

Everything here is pure computation: no I/O, no clocks, no global randomness. Randomness comes from
:func:`new_rng`, seeded from the operating system's CSPRNG at every call.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from tessera.crypto import Identity, PublicIdentity, pairwise_mask
from tessera.errors import InvalidInput, Refused
from tessera.needs import NEED_CATEGORIES, NEED_STATUSES

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = [
    "DEFAULT_BOUND",
    "HISTOGRAM_SHARE",
    "MAX_ERROR_RATIO",
    "MODULUS",
    "Rng",
    "RoundNoise",
    "TableSpec",
    "bound_report",
    "bounded_counts",
    "central_accuracy",
    "clamp_nonnegative",
    "contribution_histogram",
    "default_needs_table",
    "default_threshold",
    "describe_mechanism",
    "epsilon_for",
    "histogram_bins",
    "l1_sensitivity",
    "local_noise",
    "mask_share",
    "new_rng",
    "noise_share",
    "noise_variance",
    "pair_masks",
    "release_cells",
    "round_epsilon",
    "round_noise",
    "round_noise_share",
    "scale_for",
    "split_epsilon",
    "sum_accuracy",
    "sum_over",
    "tail_probability",
    "unmask_sum",
]

MODULUS: Final = 2**64
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
# Truncation of the NegBin support in exact accuracy computations: the neglected mass of each
# NegBin is bounded (rigorously, see _negbin_pmf) by this, and accounted for conservatively.
_TAIL_BOUND: Final = 1e-15
# Refuse exact computations whose support would exceed this many points (absurd scales).
_MAX_SUPPORT: Final = 20_000_000

Rng = np.random.Generator
"""The noise generator: numpy's Generator, obtained from :func:`new_rng` in production."""

Coordinates = tuple[str, ...]


# --- tables -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSpec:
    """A table: named axes whose Cartesian product, row-major (last axis fastest), is the cells.

    ``contribution_bound`` is the most cells one survivor's record may add 1 to: the table's L1
    sensitivity, which every node enforces in code (:func:`bounded_counts`, dropping at random).
    """

    name: str
    dimensions: tuple[tuple[str, tuple[str, ...]], ...]
    contribution_bound: int

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInput("a table needs a name")
        if not self.dimensions:
            raise InvalidInput("a table needs at least one dimension")
        names = [name for name, _ in self.dimensions]
        if len(set(names)) != len(names):
            raise InvalidInput("dimension names must be distinct")
        for name, values in self.dimensions:
            if not values or len(set(values)) != len(values):
                raise InvalidInput(f"dimension {name!r} needs distinct values")
        if not isinstance(self.contribution_bound, int) or self.contribution_bound < 1:
            raise InvalidInput("contribution_bound must be a positive integer")

    @property
    def cells(self) -> list[Coordinates]:
        """Every cell's coordinates, in cell order (row-major, last dimension fastest)."""
        return list(itertools.product(*(values for _, values in self.dimensions)))

    @property
    def size(self) -> int:
        """The number of cells."""
        return math.prod(len(values) for _, values in self.dimensions)

    def index(self, coordinates: Sequence[str]) -> int:
        """The position of a cell in cell order; InvalidInput for unknown coordinates."""
        if len(coordinates) != len(self.dimensions):
            raise InvalidInput(f"a cell of {self.name!r} has {len(self.dimensions)} coordinates")
        position = 0
        for value, (name, values) in zip(coordinates, self.dimensions, strict=True):
            try:
                offset = values.index(value)
            except ValueError:
                raise InvalidInput(f"{value!r} is not a value of dimension {name!r}") from None
            position = position * len(values) + offset
        return position


#: The contribution bound of a round with no histogram to size it from (the first round of a
#: table in a region). A survivor rarely has more than six aftercare needs open at once; the
#: release's histogram then sizes the next round's bound to the data (:func:`bound_report`).
DEFAULT_BOUND: Final = 6
#: The part of a round's ε spent on its contribution histogram; the table gets the rest.
HISTOGRAM_SHARE: Final = 0.2
#: The most a private round's error may exceed the central mechanism's by default (docs/privacy.md).
MAX_ERROR_RATIO: Final = 1.2
#: Largest share of contributions a suggested bound may drop (by the histogram's estimate).
MAX_DROPPED_FRACTION: Final = 0.01


def default_needs_table(contribution_bound: int = DEFAULT_BOUND) -> TableSpec:
    """Needs by category and status, in the enum orders of :mod:`tessera.needs`.

    A survivor has one status per category, so their record falls in at most one cell per
    category; the bound caps how many categories count.
    """
    return TableSpec(
        name="needs_by_category_status",
        dimensions=(
            ("need_category", tuple(c.value for c in NEED_CATEGORIES)),
            ("need_status", tuple(s.value for s in NEED_STATUSES)),
        ),
        contribution_bound=contribution_bound,
    )


def histogram_bins(spec: TableSpec) -> int:
    """Bins of a table's contribution histogram: the most cells one record can fall in.

    For a table whose first dimension is ``need_category`` that is the number of categories (one
    status per category); otherwise every cell, capped at 32 (the last bin counts the rest).
    """
    if spec.dimensions[0][0] == "need_category":
        return len(spec.dimensions[0][1])
    return min(spec.size, 32)


def default_threshold(participants: int) -> int:
    """The threshold a round gets unless asked otherwise: the least t ≥ 2 whose error is at most
    :data:`MAX_ERROR_RATIO` times the central mechanism's.

    The total noise of n shares of threshold t has √(n/t) times the central standard deviation,
    so t = ⌈n / 1.2²⌉ = ⌈25n / 36⌉, computed in integers. It tolerates n - t participants
    colluding with the broker or dropping out (docs/privacy.md, "The threshold").
    """
    n = _check_count(participants)
    return min(n, max(2, (25 * n + 35) // 36))


def split_epsilon(epsilon: float, with_histogram: bool) -> tuple[float, float]:
    """(ε of the table, ε of the histogram): the histogram takes :data:`HISTOGRAM_SHARE`."""
    epsilon = _check_positive("epsilon", epsilon)
    if not with_histogram:
        return epsilon, 0.0
    histogram = epsilon * HISTOGRAM_SHARE
    return epsilon - histogram, histogram


def l1_sensitivity(spec: TableSpec) -> int:
    """The table's L1 sensitivity: its contribution bound.

    Adding or removing one survivor's record at one agency changes at most ``contribution_bound``
    cells, each by exactly 1, because :func:`bounded_counts` counts a survivor at most once per cell
    and in at most that many cells (whichever it keeps). So the L1 distance between neighbouring
    tables is at most the bound.
    """
    return spec.contribution_bound


def _record_cells(record: Iterable[Sequence[str]], spec: TableSpec) -> list[int]:
    """A record's distinct cell positions, ascending."""
    return sorted({spec.index(coordinates) for coordinates in record})


def bounded_counts(
    records: Iterable[Iterable[Sequence[str]]], spec: TableSpec, rng: Rng
) -> list[int]:
    """Count cells with each survivor's contribution bounded (the sensitivity's premise).

    ``records`` yields, per survivor, the coordinates of the cells their record falls in. Each
    survivor counts at most once per cell (duplicates collapse) and in at most
    ``contribution_bound`` cells: if more, that many are kept **uniformly at random** (``rng``), so
    no category is dropped more often than another and the loss shows evenly, never as a silent
    hole in the last categories. The histogram (:func:`contribution_histogram`) measures it.
    """
    counts = [0] * spec.size
    bound = spec.contribution_bound
    for record in records:
        cells = _record_cells(record, spec)
        if len(cells) > bound:
            chosen = rng.choice(len(cells), size=bound, replace=False)
            cells = [cells[int(i)] for i in chosen]
        for position in cells:
            counts[position] += 1
    return counts


def contribution_histogram(
    records: Iterable[Iterable[Sequence[str]]], spec: TableSpec, bins: int
) -> list[int]:
    """How many survivors fall in m cells, for m = 1 .. bins (the last bin counts m ≥ bins).

    Each survivor with a record in the table adds 1 to exactly one bin, so the L1 sensitivity is 1
    (adding or removing one record), whatever the table's bound.
    """
    histogram = [0] * bins
    for record in records:
        cells = len(_record_cells(record, spec))
        if cells:
            histogram[min(cells, bins) - 1] += 1
    return histogram


def bound_report(
    histogram: Sequence[int], significance: float, bound: int, floor: int = DEFAULT_BOUND
) -> tuple[float, int]:
    """(estimated share of contributions ``bound`` dropped, the bound for the next round).

    Post-processing of a released histogram: it costs no privacy. A bin counts only when its noisy
    value exceeds ``significance`` (a half-width at a Bonferroni-corrected level, so an empty bin
    rarely looks full). With bin m holding h_m survivors, the bound k drops Σ_{m>k} (m - k) h_m of
    Σ m h_m contributions. The next bound is the least k dropping at most 1% of them, but never
    below ``floor``: a noisy histogram of a small region cannot tell an empty bin from a thin one,
    and a bound too low biases every cell while one too high only widens the intervals. So the
    histogram raises the bound where records hold more cells, and a coordinator who wants a
    smaller one asks for it and sees what it drops. With no significant bin: (0, 0).
    """
    kept = [value if value > significance else 0 for value in histogram]
    total = sum(m * h for m, h in enumerate(kept, start=1))
    if total == 0:
        return 0.0, 0

    def dropped(k: int) -> int:
        return sum((m - k) * h for m, h in enumerate(kept, start=1) if m > k)

    least = next(k for k in range(1, len(kept) + 1) if dropped(k) <= MAX_DROPPED_FRACTION * total)
    return dropped(bound) / total, max(least, min(floor, len(kept)))


# --- calibration (OpenDP) -----------------------------------------------------------------------


@cache
def _opendp() -> Any:
    """OpenDP's prelude with the ``contrib`` features enabled (imported lazily)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


def _check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidInput(f"{name} must be a positive finite number")
    return float(value)


def _check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InvalidInput("alpha must be strictly between 0 and 1")
    return float(alpha)


def _check_sensitivity(sensitivity: int) -> int:
    if not isinstance(sensitivity, int) or sensitivity < 1:
        raise InvalidInput("sensitivity must be a positive integer")
    return sensitivity


def scale_for(epsilon: float, sensitivity: int) -> float:
    """The discrete-Laplace scale giving ε for this L1 sensitivity: s = sensitivity / ε.

    :func:`epsilon_for` (OpenDP's privacy map) confirms the figure; tests check the round trip.
    """
    return _check_sensitivity(sensitivity) / _check_positive("epsilon", epsilon)


def epsilon_for(scale: float, sensitivity: int) -> float:
    """ε of the central mechanism, computed by OpenDP's privacy map.

    The mechanism is ``make_laplace`` on vectors of integers with the L1 distance at this scale (the
    discrete Laplace, the total noise of a private round); the map is evaluated at ``sensitivity``.
    """
    dp = _opendp()
    measurement = dp.m.make_laplace(
        dp.vector_domain(dp.atom_domain(T=int)),
        dp.l1_distance(T=int),
        scale=_check_positive("scale", scale),
    )
    return float(measurement.map(_check_sensitivity(sensitivity)))


def central_accuracy(scale: float, alpha: float) -> float:
    """OpenDP's accuracy of the discrete Laplace: ``discrete_laplacian_scale_to_accuracy``.

    OpenDP's convention: the returned a solves alpha = 2p^a / (1 + p), the continuous extension of
    P(|X| ≥ k); since X is an integer, P(|X| > floor(a)) ≤ alpha, so [v - a, v + a] covers with
    probability at least 1 - alpha, and flooring a keeps that coverage.
    """
    from opendp.accuracy import discrete_laplacian_scale_to_accuracy

    _opendp()
    return float(
        discrete_laplacian_scale_to_accuracy(_check_positive("scale", scale), _check_alpha(alpha))
    )


@dataclass(frozen=True)
class RoundNoise:
    """The noise scales of a round's vector: the table's cells, then the histogram's bins.

    The table (L1 sensitivity = its bound k) gets ε_t = ε - ε_h, so scale k / ε_t; the histogram
    (L1 sensitivity 1) gets ε_h, so scale 1 / ε_h. By sequential composition the round's ε is the
    sum of the two parts' ε, each from OpenDP's privacy map (:func:`round_epsilon`).
    """

    table_cells: int
    table_scale: float
    histogram_bins: int
    histogram_scale: float

    @property
    def cells(self) -> int:
        """The length of a share's vector."""
        return self.table_cells + self.histogram_bins


def round_noise(
    spec: TableSpec, epsilon: float, histogram_bins: int = 0, histogram_epsilon: float = 0.0
) -> RoundNoise:
    """The scales for a round of ``spec`` at total ``epsilon`` (see :class:`RoundNoise`)."""
    epsilon = _check_positive("epsilon", epsilon)
    if histogram_bins == 0:
        return RoundNoise(spec.size, scale_for(epsilon, l1_sensitivity(spec)), 0, 0.0)
    if not isinstance(histogram_bins, int) or not 0 < histogram_bins <= spec.size:
        raise InvalidInput("the histogram needs between 1 and the table's cells bins")
    histogram_epsilon = _check_positive("the histogram's epsilon", histogram_epsilon)
    if histogram_epsilon >= epsilon:
        raise InvalidInput("the histogram's epsilon must be below the round's")
    return RoundNoise(
        spec.size,
        scale_for(epsilon - histogram_epsilon, l1_sensitivity(spec)),
        histogram_bins,
        scale_for(histogram_epsilon, 1),
    )


def round_epsilon(noise: RoundNoise, spec: TableSpec) -> tuple[float, float]:
    """(ε of the whole round, ε of the table), each part's ε from OpenDP's privacy map."""
    table = epsilon_for(noise.table_scale, l1_sensitivity(spec))
    if noise.histogram_bins == 0:
        return table, table
    return table + epsilon_for(noise.histogram_scale, 1), table


def round_noise_share(noise: RoundNoise, threshold: int, rng: Rng) -> list[int]:
    """One participant's noise share for the whole vector: each part at its own scale."""
    share = noise_share(noise.table_cells, noise.table_scale, threshold, rng)
    if noise.histogram_bins:
        share += noise_share(noise.histogram_bins, noise.histogram_scale, threshold, rng)
    return share


# --- noise --------------------------------------------------------------------------------------


def new_rng() -> Rng:
    """A fresh generator seeded with 256 bits from the operating system's CSPRNG.

    Call it once per round: never a fixed, time-derived or reused seed (section 7).
    """
    return np.random.Generator(np.random.PCG64(int.from_bytes(secrets.token_bytes(32), "big")))


def _p(scale: float) -> tuple[float, float]:
    """(p, 1 - p) for p = exp(-1/scale), with 1 - p computed without cancellation."""
    scale = _check_positive("scale", scale)
    return math.exp(-1.0 / scale), -math.expm1(-1.0 / scale)


def _check_cells(cells: int) -> int:
    if not isinstance(cells, int) or cells < 1:
        raise InvalidInput("cells must be a positive integer")
    return cells


def _check_threshold(threshold: int) -> int:
    if not isinstance(threshold, int) or threshold < 1:
        raise InvalidInput("threshold must be a positive integer")
    return threshold


def _negbin(rng: Rng, r: float, p: float, q: float, cells: int) -> NDArray[np.int64]:
    """NegBin(r, p) draws (failures before a success of probability q = 1 - p), as section 7 says:
    Poisson(Gamma(shape r, scale p / q))."""
    rates = rng.gamma(shape=r, scale=p / q, size=cells)
    return rng.poisson(rates).astype(np.int64)


def noise_share(cells: int, scale: float, threshold: int, rng: Rng) -> list[int]:
    """One participant's noise share: NegBin(1/t, p) - NegBin(1/t, p) per cell, p = exp(-1/s).

    Any ``threshold`` honest shares sum to the discrete Laplace of scale ``scale``; n > t shares sum
    to NegBin(n/t, p) - NegBin(n/t, p), which has n/t times its variance.
    """
    cells = _check_cells(cells)
    r = 1.0 / _check_threshold(threshold)
    p, q = _p(scale)
    noise = _negbin(rng, r, p, q, cells) - _negbin(rng, r, p, q, cells)
    return [int(x) for x in noise]


def local_noise(cells: int, scale: float, rng: Rng) -> list[int]:
    """Local-noise mode: the full discrete Laplace of scale ``scale`` per cell (threshold 1)."""
    return noise_share(cells, scale, 1, rng)


def describe_mechanism(n: int, threshold: int, scale: float) -> str:
    """The mechanism in words, for ``Release.mechanism``."""
    if threshold == 1 and n > 1:
        return f"discrete Laplace, scale {scale}, added by each of {n} agencies (local noise)"
    return (
        f"discrete Laplace, scale {scale}, as the sum of {n} NegBin share differences"
        f" (threshold {threshold})"
    )


def noise_variance(n: int, threshold: int, scale: float) -> float:
    """Variance of the sum of n shares: n/t · 2p / (1 - p)², p = exp(-1/s).

    NegBin(r, p) has variance r p / (1 - p)²; the difference of two independent ones twice that.
    """
    p, q = _p(scale)
    return _check_count(n) / _check_threshold(threshold) * 2.0 * p / (q * q)


def _check_count(n: int) -> int:
    if not isinstance(n, int) or n < 1:
        raise InvalidInput("the number of participants must be a positive integer")
    return n


# --- exact accuracy of the sum ------------------------------------------------------------------


@lru_cache(maxsize=64)
def _negbin_pmf(r: float, scale: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The pmf of NegBin(r, p) on 0..K, and its survival S[m] = P(G ≥ m) for m = 0..K+1.

    pmf(k) = Γ(k + r) / (Γ(r) k!) · (1 - p)^r · p^k, through log-gamma. K is the first point past
    the mean where the neglected tail is provably below ``_TAIL_BOUND``: for k ≥ K the ratio
    pmf(k + 1) / pmf(k) = p (k + r) / (k + 1) is at most rho = p · max(1, (K + r) / (K + 1)) < 1, so
    P(G > K) ≤ pmf(K) · rho / (1 - rho). The survival omits that tail (it is at most ``_TAIL_BOUND``
    below the truth), and callers add the bound back.
    """
    p, q = _p(scale)
    log_p, log_q = -1.0 / scale, math.log(q)
    mean, sd = r * p / q, math.sqrt(r * p) / q

    def log_pmf(k: int) -> float:
        return math.lgamma(k + r) - math.lgamma(r) - math.lgamma(k + 1) + r * log_q + k * log_p

    def tail_bound(k: int) -> float:
        rho = p * max(1.0, (k + r) / (k + 1))
        return math.exp(log_pmf(k)) * rho / (1 - rho)

    support = math.ceil(mean + 10 * sd) + 10
    while support <= _MAX_SUPPORT and tail_bound(support) > _TAIL_BOUND:
        support *= 2
    if support > _MAX_SUPPORT:
        raise InvalidInput("the noise scale is too large to compute its accuracy")
    ks = np.arange(support + 1, dtype=np.float64)
    lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
    pmf = np.exp(lgamma(ks + r) - math.lgamma(r) - lgamma(ks + 1) + r * log_q + ks * log_p)
    survival = np.zeros(support + 2)
    survival[:-1] = np.cumsum(pmf[::-1])[::-1]  # summed from the small end: no cancellation
    return pmf, survival


def tail_probability(n: int, threshold: int, scale: float, k: int) -> float:
    """An upper bound, tight to 1e-14, on P(|X| > k) for X the sum of n noise shares.

    X = G1 - G2 with G1, G2 independent NegBin(n/t, p), symmetric, so
    P(|X| > k) = 2 P(G1 - G2 > k) = 2 Σ_j P(G2 = j) P(G1 ≥ j + k + 1) for k ≥ 0. The truncated
    support loses at most ``_TAIL_BOUND`` of each NegBin, added back here (twice per side).
    """
    if not isinstance(k, int) or k < 0:
        raise InvalidInput("k must be a non-negative integer")
    pmf, survival = _negbin_pmf(_check_count(n) / _check_threshold(threshold), float(scale))
    return min(1.0, 2.0 * (_one_side(pmf, survival, k) + 2 * _TAIL_BOUND))


def _one_side(pmf: NDArray[np.float64], survival: NDArray[np.float64], k: int) -> float:
    """Σ_j pmf[j] · survival[j + k + 1] over the truncated support (P(G1 - G2 > k), truncated)."""
    start = k + 1
    if start >= len(survival):
        return 0.0
    stop = len(survival)
    count = min(len(pmf), stop - start)
    return float(np.dot(pmf[:count], survival[start : start + count]))


def sum_accuracy(n: int, threshold: int, scale: float, alpha: float) -> float:
    """Half-width of the (1 - alpha) interval of the sum of n shares, exactly from its law.

    Returns the least integer k with P(|X| > k) ≤ alpha for X = NegBin(n/t, p) - NegBin(n/t, p),
    so a released value v has [v - k, v + k] containing the true count with probability at least
    1 - alpha. For n = t it is the floor of OpenDP's :func:`central_accuracy` (same convention,
    on integers).
    Refused if n < t: fewer shares than the threshold do not carry the full noise.
    """
    n, threshold, alpha = _check_count(n), _check_threshold(threshold), _check_alpha(alpha)
    if n < threshold:
        raise Refused(f"{n} participants are fewer than the threshold {threshold}")
    pmf, survival = _negbin_pmf(n / threshold, _check_positive("scale", scale))

    def covered(k: int) -> bool:
        return 2.0 * (_one_side(pmf, survival, k) + 2 * _TAIL_BOUND) <= alpha

    low, high = 0, len(survival)  # covered(high) holds: the truncated tail is empty there
    while low < high:  # binary search: the tail decreases in k
        middle = (low + high) // 2
        if covered(middle):
            high = middle
        else:
            low = middle + 1
    return float(low)


# --- masking ------------------------------------------------------------------------------------


def _check_signed(value: int) -> int:
    if not isinstance(value, int) or not _INT64_MIN <= value <= _INT64_MAX:
        raise InvalidInput("a cell value must be a signed 64-bit integer")
    return value


def mask_share(
    values: Sequence[int],
    masks_to_add: Iterable[Sequence[int]] = (),
    masks_to_subtract: Iterable[Sequence[int]] = (),
) -> list[int]:
    """A participant's submitted cells: signed values plus masks minus masks, each mod 2**64."""
    out = [_check_signed(v) % MODULUS for v in values]
    for sign, masks in ((1, masks_to_add), (-1, masks_to_subtract)):
        for mask in masks:
            if len(mask) != len(out):
                raise InvalidInput("a mask must have one entry per cell")
            out = [(a + sign * m) % MODULUS for a, m in zip(out, mask, strict=True)]
    return out


def unmask_sum(shares: Iterable[Sequence[int]]) -> list[int]:
    """Sum submitted cells mod 2**64 and read each sum back as a signed 64-bit integer."""
    total: list[int] | None = None
    for share in shares:
        if total is None:
            total = [0] * len(share)
        if len(share) != len(total):
            raise InvalidInput("every share must have the same number of cells")
        total = [(a + b) % MODULUS for a, b in zip(total, share, strict=True)]
    if total is None:
        raise InvalidInput("no shares to sum")
    return [v - MODULUS if v > _INT64_MAX else v for v in total]


def pair_masks(
    own_identity: Identity,
    own_position: int,
    participants: Sequence[tuple[str, PublicIdentity]],
    round_id: str,
    attempt: int,
    cells: int,
) -> list[int]:
    """This participant's net mask, mod 2**64: added pairwise masks minus subtracted ones.

    For every other participant at position k (positions in the round's ascending participant
    list), the pair's mask is ``pairwise_mask`` with R = f"{round_id}/{attempt}"; it is added when
    own_position < k and subtracted otherwise, so the net masks of all participants sum to 0.
    """
    if not 0 <= own_position < len(participants):
        raise InvalidInput("own_position is not a participant's position")
    ids = [agency for agency, _ in participants]
    if ids != sorted(ids, key=lambda agency: agency.encode()) or len(set(ids)) != len(ids):
        raise InvalidInput("participants must be distinct and in ascending byte order")
    if participants[own_position][1].encryption_key != own_identity.public.encryption_key:
        raise InvalidInput("own_position does not hold this node's identity")
    if not isinstance(attempt, int) or attempt < 1:
        raise InvalidInput("attempt must be a positive integer")
    r = f"{round_id}/{attempt}".encode()
    net = [0] * _check_cells(cells)
    for position, (_, peer) in enumerate(participants):
        if position == own_position:
            continue
        mask = pairwise_mask(own_identity, peer, r, cells)
        sign = 1 if own_position < position else -1
        net = [(a + sign * m) % MODULUS for a, m in zip(net, mask, strict=True)]
    return net


# --- release and free post-processing -----------------------------------------------------------


def release_cells(
    sum_values: Sequence[int],
    spec: TableSpec,
    n: int,
    threshold: int,
    scale: float,
    alpha: float,
) -> list[tuple[Coordinates, int, float, float]]:
    """(coordinates, value, lower, upper) per cell, in cell order, with the exact interval of
    :func:`sum_accuracy` for the actual n participants."""
    if len(sum_values) != spec.size:
        raise InvalidInput(f"{spec.name!r} has {spec.size} cells, got {len(sum_values)}")
    accuracy = sum_accuracy(n, threshold, scale, alpha)
    return [
        (coordinates, value, value - accuracy, value + accuracy)
        for coordinates, value in zip(spec.cells, sum_values, strict=True)
    ]


def clamp_nonnegative(values: Iterable[int]) -> list[int]:
    """Negative noisy counts raised to 0. Post-processing of a release: costs no privacy."""
    return [max(0, v) for v in values]


def sum_over(values: Sequence[int], spec: TableSpec, dimension: str) -> tuple[TableSpec, list[int]]:
    """Sum a released table over one dimension (for example total needs per category).

    Post-processing: costs no privacy. The per-cell intervals do not carry over (a sum of m noisy
    cells has m times the variance); the result's spec keeps the same contribution bound.
    """
    if len(values) != spec.size:
        raise InvalidInput(f"{spec.name!r} has {spec.size} cells, got {len(values)}")
    names = [name for name, _ in spec.dimensions]
    if dimension not in names or len(names) == 1:
        raise InvalidInput(f"cannot sum {spec.name!r} over {dimension!r}")
    axis = names.index(dimension)
    kept = tuple(d for d in spec.dimensions if d[0] != dimension)
    result = TableSpec(f"{spec.name}_by_{dimension}_summed", kept, spec.contribution_bound)
    totals = [0] * result.size
    for coordinates, value in zip(spec.cells, values, strict=True):
        totals[result.index(coordinates[:axis] + coordinates[axis + 1 :])] += value
    return result, totals
