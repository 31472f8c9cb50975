"""Uncertainty of the evaluation's numbers: bootstrap percentile intervals over pairs or over prompts (pure functions).

Every number ``evaluate`` reports (a curve point, an area, AUROC, ECE, the recovered share of the
(oracle − random) area, the paired difference uncertainty − random) is a statistic of the N evaluated pairs. The
bootstrap redraws N pairs with replacement (or, when pairs share a prompt, redraws whole prompts: the cluster
bootstrap, because pairs of one prompt are not independent draws) and recomputes the statistic on each redraw;
the 2.5% and 97.5% quantiles of the redrawn values form the 95% percentile interval.

The paired difference is computed on the *same* redraw for both routers, so what the two curves share (which
pairs are hard for the judge) cancels, and its interval is narrower than the two curves' intervals suggest.

Routers beyond the four built in (uncertainty, random, margin, oracle) enter as *priorities* (higher first, ties
broken at random in expectation: :func:`expected_curve_at`): a length-only control, a learned delegation score, a
perfect detector of a shifted family. With a ``length`` priority, every other router's paired difference against
it is reported too: the share of the PM's errors a router finds beyond what response length alone finds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torchmetrics.functional.classification import binary_calibration_error

from lit_route.eval.curves import margin_order, oracle_order, uncertainty_order
from lit_route.preference.metrics import auroc
from lit_route.routing.routers import count_for_fraction


def cluster_ids(keys: Sequence) -> torch.Tensor:
    """Integer cluster id (N,) long for each of ``keys`` (e.g. prompt texts): equal keys share an id."""
    ids: dict = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)


def resample_indices(n: int, n_boot: int, seed: int = 0, clusters: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``n_boot`` bootstrap redraws of ``range(n)``.

    Args:
        n: Number of items (pairs).
        n_boot: Number of redraws.
        seed: Seed of the generator (the same seed gives the same redraws).
        clusters: (n,) long cluster id of each item, or ``None``. With clusters, each redraw draws as many
            clusters as there are, with replacement, and takes every item of each drawn cluster (so a redraw's
            size varies around ``n``).

    Returns:
        ``n_boot`` long tensors of item indices; without clusters each has shape (n,).
    """
    generator = torch.Generator().manual_seed(seed)
    if clusters is None:
        return list(torch.randint(0, n, (n_boot, n), generator=generator))
    if clusters.numel() != n:
        raise ValueError(f"clusters: expected {n} ids, got {clusters.numel()}")
    _, inverse = torch.unique(clusters, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]])
    members = [order[s : s + c] for s, c in zip(starts.tolist(), counts.tolist(), strict=True)]
    draws = torch.randint(0, len(members), (n_boot, len(members)), generator=generator)
    return [torch.cat([members[c] for c in row.tolist()]) for row in draws]


def percentile_interval(samples: torch.Tensor, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile interval of bootstrap ``samples`` (B, ...) along the first axis, ignoring NaN (a redraw where the
    statistic is undefined); returns ``(lo, hi)`` of shape (...), NaN where every redraw was NaN."""
    alpha = (1.0 - level) / 2
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    bounds = torch.nanquantile(samples.double(), q, dim=0)
    return bounds[0], bounds[1]


def bootstrap(statistic: Callable[[torch.Tensor], torch.Tensor], n: int, n_boot: int = 1000, level: float = 0.95,
              seed: int = 0, clusters: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Point value and percentile interval of ``statistic``.

    Args:
        statistic: Maps a long tensor of item indices (M,) to a float tensor of any fixed shape (...); it is called
            once on ``arange(n)`` (the point value) and once per redraw.
        n: Number of items.
        n_boot: Number of redraws.
        level: Coverage of the interval.
        seed: Seed of the redraws.
        clusters: (n,) cluster ids for the cluster bootstrap (see :func:`resample_indices`).

    Returns:
        ``{"point", "lo", "hi"}``, each of the statistic's shape (float64), and ``"samples"`` (n_boot, ...).
    """
    point = statistic(torch.arange(n)).double()
    samples = torch.stack([statistic(idx).double() for idx in resample_indices(n, n_boot, seed, clusters)])
    lo, hi = percentile_interval(samples, level)
    return {"point": point, "lo": lo, "hi": hi, "samples": samples}


def curve_at(order: torch.Tensor, pm_correct: torch.Tensor, judge_score: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Accuracy when the first ``k`` pairs of ``order`` take the judge's answer, for each ``k`` in ``ks`` (F,).

    ``order`` (N,) priority (first judged first), ``pm_correct`` and ``judge_score`` (N,); returns (F,) float64.
    The same numbers as :func:`lit_route.eval.curves.curve_for_order`, for many ``k`` at once.
    """
    n = pm_correct.numel()
    gain = (judge_score.double() - pm_correct.double())[order]
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), gain.cumsum(0)])
    return (pm_correct.double().sum() + cumulative[ks]) / n


def random_curve_at(pm_correct: torch.Tensor, judge_score: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Expected accuracy of judging ``k`` uniformly random pairs, for each ``k`` in ``ks`` (F,): (F,) float64."""
    n = pm_correct.numel()
    mean_gain = (judge_score.double() - pm_correct.double()).mean()
    return pm_correct.double().mean() + ks.double() / n * mean_gain


def expected_curve_at(priority: torch.Tensor, pm_correct: torch.Tensor, judge_score: torch.Tensor,
                      ks: torch.Tensor) -> torch.Tensor:
    """Expected accuracy when the ``k`` pairs of highest ``priority`` take the judge's answer, ties broken uniformly at
    random, for each ``k`` in ``ks`` (F,): (F,) float64.

    Pairs of equal priority form a group; the first ``k`` pairs take whole groups in priority order and, from the
    group that ``k`` cuts, ``k − start`` pairs whose expected gain is that many times the group's mean gain. A
    constant priority gives :func:`random_curve_at`; distinct priorities give :func:`curve_at` of their order.

    Args:
        priority: (N,) higher first.
        pm_correct: (N,) 1 where the PM is right.
        judge_score: (N,) the judge's credit.
        ks: (F,) long, numbers of pairs judged.
    """
    n = pm_correct.numel()
    order = torch.argsort(priority.double(), descending=True, stable=True)
    gain = (judge_score.double() - pm_correct.double())[order]
    _, group, counts = torch.unique_consecutive(priority.double()[order], return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, group, gain)
    ends = counts.cumsum(0)  # (G,) pairs judged once group g is taken whole
    starts = ends - counts
    before = torch.cat([torch.zeros(1, dtype=torch.float64), sums.cumsum(0)[:-1]])  # gain of the groups above g
    g = torch.searchsorted(ends, ks, right=False).clamp(max=counts.numel() - 1)  # the group the k-th pair is in
    partial = (ks - starts[g]).clamp(min=0).double() * sums[g] / counts[g].double()
    cumulative = torch.where(ks > 0, before[g] + partial, torch.zeros_like(partial))
    return (pm_correct.double().sum() + cumulative) / n


def trapezoid_area(fractions: torch.Tensor, accuracy: torch.Tensor) -> torch.Tensor:
    """Mean accuracy over ``fractions`` (F,) by the trapezoid rule; ``accuracy`` (..., F) -> (...)."""
    return torch.trapezoid(accuracy, fractions, dim=-1) / (fractions[-1] - fractions[0])


ROUTERS = ("uncertainty", "random", "margin", "oracle")


def routing_statistics(d: torch.Tensor, u: torch.Tensor, judge_score: torch.Tensor, fractions: Sequence[float],
                       upto: float = 0.5, n_bins: int = 10,
                       priorities: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Every reported number of one set of pairs, flattened into one vector (see :func:`unpack_statistics`).

    Args:
        d: (N,) PM scores d(chosen, rejected) (``d > 0``: the PM is right).
        u: (N,) the PM's uncertainties ū.
        judge_score: (N,) the judge's credit (1 right, 0.5 tie, 0 wrong; the PM's answer where it failed).
        fractions: (F,) judge fractions in [0, 1], increasing.
        upto: The recovered share is measured on the fractions ≤ ``upto``.
        n_bins: Bins of the ECE.
        priorities: More routers, name -> (N,) priority (higher first; :func:`expected_curve_at`).

    Returns:
        (4·F + F + 4 + 5,) float64: the four routers' curves, the difference uncertainty − random per fraction, the
        four areas over all fractions, then the recovered share on [0, upto] (NaN when oracle and random areas are
        equal), AUROC(ū → error), ECE of σ(d), PM accuracy, judge accuracy. With ``priorities`` (M of them), then:
        their curves (M·F), the recovered share of uncertainty, margin and each of them (2 + M), and, when one is
        named ``length``, the paired difference against it per fraction and of the recovered share for
        uncertainty, margin and every other priority (R·F + R, R = M + 1).
    """
    n = d.numel()
    d, u, judge_score = d.double(), u.double(), judge_score.double()
    pm_correct = (d > 0).double()
    ks = torch.tensor([count_for_fraction(n, f) for f in fractions])
    x = torch.tensor(list(fractions), dtype=torch.float64)
    curves = torch.stack([
        curve_at(uncertainty_order(u), pm_correct, judge_score, ks),
        random_curve_at(pm_correct, judge_score, ks),
        curve_at(margin_order(d), pm_correct, judge_score, ks),
        curve_at(oracle_order(d, judge_score), pm_correct, judge_score, ks),
    ])
    areas = trapezoid_area(x, curves)
    head = x <= upto + 1e-12
    part = trapezoid_area(x[head], curves[:, head]) if int(head.sum()) > 1 else curves[:, 0]
    headroom = part[3] - part[1]
    recovered = (part[0] - part[1]) / headroom if float(headroom) > 1e-12 else torch.tensor(float("nan"))
    target = torch.ones(n, dtype=torch.long)
    p = torch.sigmoid(d)
    ece = binary_calibration_error(torch.cat([p, 1 - p]).float(), torch.cat([target, 1 - target]), n_bins=n_bins)
    scalars = torch.stack([recovered.double(), torch.tensor(auroc(u, 1 - pm_correct), dtype=torch.float64),
                           ece.double(), pm_correct.mean(), judge_score.mean()])
    base = torch.cat([curves.flatten(), curves[0] - curves[1], areas, scalars])
    if not priorities:
        return base
    extra = torch.stack([expected_curve_at(p.double(), pm_correct, judge_score, ks) for p in priorities.values()])
    routed = torch.cat([curves[[0, 2]], extra])  # uncertainty, margin, then the priorities
    share = trapezoid_area(x[head], routed[:, head]) if int(head.sum()) > 1 else routed[:, 0]
    shares = (share - part[1]) / headroom if float(headroom) > 1e-12 else torch.full_like(share, float("nan"))
    out = [base, extra.flatten(), shares]
    names = list(priorities)
    if "length" in names:
        at = 2 + names.index("length")
        others = [i for i in range(routed.shape[0]) if i != at]
        out += [(routed[others] - routed[at]).flatten(), shares[others] - shares[at]]
    return torch.cat(out)


SCALARS = ("recovered_share", "auroc_uncertainty", "ece", "pm_accuracy", "judge_accuracy")


def unpack_statistics(vector: torch.Tensor, n_fractions: int, priorities: Sequence[str] = ()) -> dict:
    """Splits a :func:`routing_statistics` vector (or interval bound) into named lists and floats (NaN -> None).

    With ``priorities`` (the names given to :func:`routing_statistics`, in order), also ``curves`` of each,
    ``recovered`` (router -> recovered share, for uncertainty, margin and each priority) and, with a ``length``
    priority, ``difference_vs_length`` (router -> per-fraction difference) and ``recovered_vs_length`` (router ->
    difference of recovered shares)."""
    values = [None if v != v else v for v in vector.tolist()]
    f = n_fractions
    out = {"curves": {r: values[i * f : (i + 1) * f] for i, r in enumerate(ROUTERS)},
           "difference_uncertainty_random": values[4 * f : 5 * f],
           "area_under_curve": dict(zip(ROUTERS, values[5 * f : 5 * f + 4], strict=True))}
    out.update(zip(SCALARS, values[5 * f + 4 : 5 * f + 9], strict=True))
    if not priorities:
        return out
    names = list(priorities)
    pos = 5 * f + 9
    for name in names:
        out["curves"][name] = values[pos : pos + f]
        pos += f
    routers = ["uncertainty", "margin", *names]
    out["recovered"] = dict(zip(routers, values[pos : pos + len(routers)], strict=True))
    pos += len(routers)
    if "length" in names:
        others = [r for r in routers if r != "length"]
        out["difference_vs_length"] = {r: values[pos + i * f : pos + (i + 1) * f] for i, r in enumerate(others)}
        pos += len(others) * f
        out["recovered_vs_length"] = dict(zip(others, values[pos : pos + len(others)], strict=True))
    return out


def routing_intervals(d: torch.Tensor, u: torch.Tensor, judge_score: torch.Tensor, fractions: Sequence[float],
                      clusters: torch.Tensor | None = None, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                      upto: float = 0.5, priorities: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Bootstrap intervals of every number of :func:`routing_statistics`, over pairs or over clusters (prompts).

    Args:
        d, u, judge_score: (N,) as in :func:`routing_statistics`.
        fractions: (F,) judge fractions.
        clusters: (N,) cluster ids (pairs of one prompt share one) for the cluster bootstrap; ``None`` redraws pairs.
        n_boot: Number of redraws.
        level: Coverage of the intervals.
        seed: Seed of the redraws.
        upto: Upper end of the range of the recovered share.
        priorities: More routers (see :func:`routing_statistics`), redrawn with the pairs.

    Returns:
        ``{"level", "n_boot", "resampled" ("pair" or "prompt"), "units", "upto", "point", "lo", "hi",
        "separated"}``; ``point``/``lo``/``hi`` each hold the structure of :func:`unpack_statistics`, and
        ``separated`` lists, per fraction, +1 where the difference's interval lies above 0, −1 below, 0 across it.
    """
    n = d.numel()

    priorities = dict(priorities or {})

    def stat(idx: torch.Tensor) -> torch.Tensor:
        return routing_statistics(d[idx], u[idx], judge_score[idx], fractions, upto,
                                  priorities={k: v[idx] for k, v in priorities.items()})

    boot = bootstrap(stat, n, n_boot, level, seed, clusters)
    f = len(fractions)
    lo_diff, hi_diff = boot["lo"][4 * f : 5 * f], boot["hi"][4 * f : 5 * f]
    separated = [1 if lo > 0 else -1 if hi < 0 else 0 for lo, hi in zip(lo_diff.tolist(), hi_diff.tolist(), strict=True)]
    units = int(torch.unique(clusters).numel()) if clusters is not None else n
    return {"level": level, "n_boot": n_boot, "resampled": "prompt" if clusters is not None else "pair",
            "units": units, "upto": upto, "priorities": list(priorities),
            **{k: unpack_statistics(boot[k], f, list(priorities)) for k in ("point", "lo", "hi")},
            "separated": separated}


def risk_split_test(d: torch.Tensor, u: torch.Tensor, judge_score: torch.Tensor, alpha: float, delta: float,
                    splits: int = 200, calibration_share: float = 0.5, clusters: torch.Tensor | None = None,
                    seed: int = 0, method: str = "hb") -> dict:
    """Risk-controlled routing measured on random calibration/test splits of one labelled set.

    On each split, τ is chosen on the calibration part by :func:`lit_route.routing.risk.risk_threshold`, and on the
    test part are measured: the share judged (ū > τ), the disagreement between PM and judge among the pairs left to
    the PM (the risk held at α), the routed system's accuracy, and random routing's expected accuracy with as many
    judge calls.

    Args:
        d, u, judge_score: (N,) as in :func:`routing_statistics`.
        alpha, delta: The risk level and the tolerated chance of exceeding it.
        splits: Number of random splits.
        calibration_share: Share of the pairs (or of the clusters) used for calibration.
        clusters: (N,) cluster ids: a split keeps each cluster (prompt) on one side.
        seed: Seed of the splits.
        method: p-value of the test (``hb`` or ``binomial``).

    Returns:
        ``held`` (share of splits whose realised disagreement is ≤ α: the guarantee asks ≥ 1 − δ), the means over
        splits of ``judged_fraction``, ``disagreement_left``, ``accuracy`` and ``random_accuracy_same_calls``, the
        2.5–97.5% range of ``judged_fraction`` over splits, and ``no_threshold`` (splits where no τ passed: every
        pair judged).
    """
    pm_correct = (d > 0).double()
    judge_score = judge_score.double()
    return risk_splits(u, (pm_correct - judge_score).abs(), pm_correct, judge_score, alpha, delta, splits,
                       calibration_share, clusters, seed, method)


def risk_splits(u: torch.Tensor, loss: torch.Tensor, kept_credit: torch.Tensor, escalated_credit: torch.Tensor,
                alpha: float, delta: float, splits: int = 200, calibration_share: float = 0.5,
                clusters: torch.Tensor | None = None, seed: int = 0, method: str = "hb") -> dict:
    """:func:`risk_split_test` for any first answer and escalation: pairs with ``u`` (N,) ≤ τ keep their first
    answer (credit ``kept_credit`` (N,)), the rest get ``escalated_credit`` (N,); ``loss`` (N,) in [0, 1] is the
    first answer's disagreement with the escalated one. For the PM and a judge, or a cheap judge (ranked by its
    bidirectional entropy) and a strong one."""
    from lit_route.routing.risk import risk_threshold

    n = u.numel()
    pm_correct, judge_score = kept_credit.double(), escalated_credit.double()
    ids = clusters if clusters is not None else torch.arange(n)
    _, inverse = torch.unique(ids, return_inverse=True)
    n_units = int(inverse.max()) + 1 if n else 0
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(splits):
        calibration_units = torch.randperm(n_units, generator=generator)[: round(calibration_share * n_units)]
        cal = torch.zeros(n_units, dtype=torch.bool).index_fill_(0, calibration_units, True)[inverse]
        test = ~cal
        choice = risk_threshold(u[cal], loss[cal], alpha, delta, method=method)
        tau = choice.tau if choice.tau is not None else -math.inf
        judged = u > tau
        left = test & ~judged
        share = float(judged[test].double().mean())
        rows.append({
            "judged_fraction": share,
            "disagreement_left": float(loss[left].mean()) if bool(left.any()) else 0.0,
            "accuracy": float(torch.where(judged, judge_score, pm_correct)[test].mean()),
            "random_accuracy_same_calls": float(pm_correct[test].mean() + share * (judge_score - pm_correct)[test].mean()),
            "none": choice.tau is None,
        })
    mean = {k: sum(r[k] for r in rows) / splits for k in ("judged_fraction", "disagreement_left", "accuracy",
                                                           "random_accuracy_same_calls")}
    fractions = torch.tensor([r["judged_fraction"] for r in rows], dtype=torch.float64)
    lo, hi = percentile_interval(fractions.unsqueeze(1))
    return {"alpha": alpha, "delta": delta, "method": method, "splits": splits, "calibration_share": calibration_share,
            "held": sum(r["disagreement_left"] <= alpha + 1e-12 for r in rows) / splits, **mean,
            "judged_fraction_range": [float(lo), float(hi)], "no_threshold": sum(r["none"] for r in rows)}


# two-sided 97.5% quantiles of Student's t by degrees of freedom (standard tables); beyond 30 the normal's 1.96
# is within 0.05 of them
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def paired_t_interval(differences: Sequence[float]) -> dict:
    """95% t interval of the mean of paired differences (one per seed: arm A − arm B on the same seed).

    Returns ``{"mean", "lo", "hi", "sd", "n"}``; with one difference the interval is unbounded (``None``).
    """
    n = len(differences)
    if n == 0:
        raise ValueError("paired_t_interval: no differences")
    mean = sum(differences) / n
    if n == 1:
        return {"mean": mean, "lo": None, "hi": None, "sd": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in differences) / (n - 1))
    half = _T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n}


def seeds_needed(effect: float, sd: float, power: float = 0.8, level: float = 0.95) -> int | None:
    """Paired runs (seeds) for a two-sided test at ``level`` to detect a mean difference ``effect`` with
    ``power``, given the differences' spread ``sd``: ``⌈((z_{1−α/2} + z_power)·sd / effect)²⌉`` (normal
    approximation; ``None`` when the effect is 0)."""
    from statistics import NormalDist

    if effect == 0:
        return None
    z = NormalDist().inv_cdf(0.5 + level / 2) + NormalDist().inv_cdf(power)
    return max(2, math.ceil((z * sd / abs(effect)) ** 2))
