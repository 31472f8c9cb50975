"""The main job's routing tables and verdicts: accuracy at each share of pairs judged for every router, the paired
differences against random routing and against the length-only control with their 95% intervals, and whether
routing pays on the set (:func:`verdict`)."""

from __future__ import annotations

ROUTERS = ("uncertainty", "margin", "random", "length", "oracle")
SHARES = (0.0, 0.1, 0.25, 0.5)
AT = 0.25  # the share of pairs judged at which the verdict is read


def _at(values: list, fractions: list[float], share: float):
    return values[fractions.index(share)]


def differences(results: dict, share: float = AT) -> dict[str, tuple[float, float, float]]:
    """Paired differences at ``share`` judged, each ``(estimate, lo, hi)``: ``uncertainty − random``,
    ``uncertainty − length`` (accuracy) and ``recovered − length`` (share of the (oracle − random) area on
    [0, 50%] that uncertainty routing recovers beyond the length control's)."""
    iv, f = results["intervals"], results["fractions"]
    out = {"uncertainty − random": tuple(_at(iv[k]["difference_uncertainty_random"], f, share)
                                         for k in ("point", "lo", "hi"))}
    if "difference_vs_length" in iv["point"]:
        out["uncertainty − length"] = tuple(_at(iv[k]["difference_vs_length"]["uncertainty"], f, share)
                                            for k in ("point", "lo", "hi"))
        out["recovered − length"] = tuple(iv[k]["recovered_vs_length"]["uncertainty"] for k in ("point", "lo", "hi"))
    return out


def verdict(results: dict, share: float = AT) -> str:
    """``pays``: uncertainty routing beats random routing and the length control at ``share`` judged, both paired
    95% intervals above 0; ``loses``: it is below either with the interval below 0; else ``not separated``."""
    diff = differences(results, share)
    checks = [diff[k] for k in ("uncertainty − random", "uncertainty − length") if k in diff]
    if all(lo is not None and lo > 0 for _, lo, _ in checks):
        return "pays"
    if any(hi is not None and hi < 0 for _, _, hi in checks):
        return "loses"
    return "not separated"


READING = {"pays": "routing by the PM's uncertainty PAYS here: it beats random routing and the length-only control "
                   "at {share:.0%} judged, both 95% intervals above 0",
           "loses": "routing by the PM's uncertainty does NOT pay here: it does worse than random routing or the "
                    "length-only control at {share:.0%} judged (a 95% interval below 0)",
           "not separated": "routing by the PM's uncertainty does NOT pay here: at {share:.0%} judged it is not "
                            "separated from random routing or the length-only control (95% intervals cover 0)"}


def table(sets: dict[str, dict], shares=SHARES) -> str:
    """Markdown: per set, accuracy at each share judged for every router, then the paired differences at 25%
    with their intervals and the set's verdict."""
    lines = ["| set (judge) | judged | " + " | ".join(ROUTERS) + " |", "|---|---|" + "---|" * len(ROUTERS)]
    notes = []
    for name, r in sets.items():
        f = r["fractions"]
        for i, share in enumerate(shares):
            label = f"{name} (judge alone {r['judge_accuracy']:.3f})" if i == 0 else ""
            row = [f"{_at(r['curves'][k], f, share):.3f}" if k in r["curves"] else "–" for k in ROUTERS]
            lines.append(f"| {label} | {share:.0%} | " + " | ".join(row) + " |")
        diffs = "; ".join(f"{k} {p:+.3f} [{lo:+.3f}, {hi:+.3f}]" for k, (p, lo, hi) in differences(r).items())
        metrics = r["metrics"]
        notes.append(f"- **{name}**: {READING[verdict(r)].format(share=AT)}. PM alone {r['pm_accuracy']:.3f}, "
                     f"AUROC(ū → PM error) {metrics['auroc_uncertainty']:.3f}, {r['n_pairs']} pairs. At {AT:.0%} "
                     f"judged, paired over {r['intervals']['units']} {r['intervals']['resampled']}s: {diffs}.")
    return "\n".join([*lines, "", *notes]) + "\n"
