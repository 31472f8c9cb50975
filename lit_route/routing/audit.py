"""``AuditTally``: what the judge says on random pairs (the audit) against what it says on routed ones.

On a uniformly random sample of pairs the judge's verdicts give an unbiased estimate of how often PM and judge
agree over all pairs. On routed pairs they say how often a judge call overturns the PM there. The difference,
``routing_gain = disagreement(routed) − disagreement(audit)``, is how many more PM answers a routed call changes
than a random call would: the value of the router, measured online.

When the decision code also reports every pair's PM score and whether it was routed (:meth:`AuditTally.observe_pool`),
the audited pairs the router left to the PM are a uniform sample of the pairs left to the PM, and the PM's own
confidence ``σ(|d|)`` on all of those pairs powers a prediction-powered estimate (:mod:`lit_route.routing.ppi`) of
their agreement with the judge. From it, with a 95% interval: the routed system's agreement with the judge, the
PM's, and the routing gain over random routing at the same number of judge calls (``audit/gain*``), and a verdict
(:meth:`AuditTally.verdict`).
"""

from __future__ import annotations

import math

import torch

from lit_route.routing.ppi import PPISums, ppi_mean, routing_estimates, verdict

# running sums; "left_*" over every pair left to the PM, "lab_*" over the audited ones among them
KEYS = ("routed_n", "routed_dis", "audit_n", "audit_dis", "pool_n", "pool_routed", "left_f", "left_f2",
        "lab_n", "lab_y", "lab_y2", "lab_f", "lab_f2", "lab_yf")


def _confidence(pm_score: float) -> float:
    """The PM's predicted chance of agreeing with the judge: ``σ(|d|)``."""
    return 1.0 / (1.0 + math.exp(-abs(pm_score)))


class AuditTally:
    """Running sums: per kind (``routed``, ``audit``) the number of judged pairs and of PM–judge disagreements,
    and the sums of the prediction-powered estimate.

    A tie counts as half a disagreement. A pair both routed and drawn for the audit counts in both.

    Args:
        level: Coverage of the intervals.
        min_verdict_pairs: Audited pairs left to the PM before a verdict is given (normal intervals on fewer
            are not to be trusted).
    """

    def __init__(self, level: float = 0.95, min_verdict_pairs: int = 30):
        self.level, self.min_verdict_pairs = level, min_verdict_pairs
        self.totals = dict.fromkeys(KEYS, 0.0)
        self._step = dict.fromkeys(self.totals, 0.0)

    def add(self, routed: bool, audited: bool, pm_score: float, judge_score: float) -> None:
        """One judged pair: the PM's score d(x, y) and the judge's credit for x (1, 0.5, 0)."""
        disagreement = abs(float(pm_score > 0) - judge_score) if pm_score != 0 else 0.5
        for kind, on in (("routed", routed), ("audit", audited)):
            if on:
                self._step[f"{kind}_n"] += 1
                self._step[f"{kind}_dis"] += disagreement
        if audited and not routed:  # a uniform sample of the pairs left to the PM
            y, f = 1.0 - disagreement, _confidence(pm_score)
            for key, value in (("lab_n", 1.0), ("lab_y", y), ("lab_y2", y * y), ("lab_f", f), ("lab_f2", f * f),
                               ("lab_yf", y * f)):
                self._step[key] += value

    def observe_pool(self, pm_scores: torch.Tensor, routed: torch.Tensor) -> None:
        """Every pair of the step (this rank's): PM scores d (any shape) and the router's mask (same shape)."""
        d = pm_scores.detach().double().flatten().cpu()  # the mask is on the CPU; these are a few numbers
        mask = routed.detach().flatten().bool().cpu()
        f = torch.sigmoid(d[~mask].abs())
        self._step["pool_n"] += d.numel()
        self._step["pool_routed"] += float(mask.sum())
        self._step["left_f"] += float(f.sum())
        self._step["left_f2"] += float((f * f).sum())

    def step_counts(self) -> list[float]:
        """This step's local sums, to be summed across ranks."""
        return [self._step[k] for k in self.totals]

    def close_step(self, global_counts: list[float]) -> None:
        """Adds the step's global sums to the totals and starts a new step."""
        for key, value in zip(self.totals, global_counts, strict=True):
            self.totals[key] += value
        self._step = dict.fromkeys(self.totals, 0.0)

    def estimates(self) -> dict | None:
        """``{"system", "pm", "gain", "left"}``, each ``(estimate, lo, hi)``, or ``None`` before the pool is
        reported or while fewer than two audited pairs were left to the PM."""
        t = self.totals
        left_n = t["pool_n"] - t["pool_routed"]
        if not t["pool_n"] or t["lab_n"] < 2 or left_n <= 0 or (t["pool_routed"] and not t["routed_n"]):
            return None  # (routed pairs but no verdict on any of them: their agreement is unknown)
        sums = PPISums(pool_n=left_n, pool_f=t["left_f"], pool_f2=t["left_f2"], n=t["lab_n"], y=t["lab_y"],
                       y2=t["lab_y2"], f=t["lab_f"], f2=t["lab_f2"], yf=t["lab_yf"])
        left = ppi_mean(sums, self.level)
        routed_agree = t["routed_n"] - t["routed_dis"]
        # pairs routed but unanswered keep the PM's answer; the judged routed pairs stand for all routed ones
        return {**routing_estimates(t["pool_routed"], routed_agree * t["pool_routed"] / t["routed_n"]
                                    if t["routed_n"] else 0.0, left_n, left), "left": left}

    def verdict(self) -> str:
        """"routing pays off: +x ± y ...", "not distinguishable from random: ...", or why there is no verdict yet."""
        est = self.estimates()
        if est is None or self.totals["lab_n"] < self.min_verdict_pairs:
            return (f"no verdict yet: {self.totals['lab_n']:.0f} audited pairs left to the PM, a verdict needs "
                    f"{self.min_verdict_pairs} (audit_fraction > 0)")
        return verdict(est["gain"], self.level)

    def metrics(self) -> dict[str, float]:
        t = self.totals
        if not t["audit_n"]:
            return {}
        audit_dis = t["audit_dis"] / t["audit_n"]
        out = {"audit/pairs": t["audit_n"], "audit/agreement": 1.0 - audit_dis}
        if t["routed_n"]:
            out["audit/routing_gain"] = t["routed_dis"] / t["routed_n"] - audit_dis
        est = self.estimates()
        if est is not None:
            for name, key in (("system", "system_agreement"), ("pm", "pm_agreement"), ("gain", "gain")):
                value, lo, hi = est[name]
                out.update({f"audit/{key}": value, f"audit/{key}_lo": lo, f"audit/{key}_hi": hi})
            lo, hi = est["gain"][1:]
            enough = t["lab_n"] >= self.min_verdict_pairs
            out["audit/pays_off"] = (1.0 if lo > 0 else -1.0 if hi < 0 else 0.0) if enough else 0.0
        return out

    def summary(self) -> dict:
        """For a run's summary: the estimates (as lists) and the verdict line."""
        est = self.estimates()
        return {"verdict": self.verdict(), "level": self.level,
                **({k: list(v) for k, v in est.items()} if est is not None else {})}

    def state_dict(self) -> dict:
        return dict(self.totals)

    def load_state_dict(self, state: dict) -> None:
        self.totals = {k: float(state.get(k, 0.0)) for k in self.totals}
