"""``AuditTally``: what the judge says on random pairs (the audit) against what it says on routed ones.

On a uniformly random sample of pairs the judge's verdicts give an unbiased estimate of how often PM and judge
agree over all pairs. On routed pairs they say how often a judge call overturns the PM there. The difference,
``routing_gain = disagreement(routed) − disagreement(audit)``, is how many more PM answers a routed call changes
than a random call would: the value of the router, measured online.
"""

from __future__ import annotations


class AuditTally:
    """Running sums: per kind (``routed``, ``audit``) the number of judged pairs and of PM–judge disagreements.

    A tie counts as half a disagreement. A pair both routed and drawn for the audit counts in both.
    """

    def __init__(self):
        self.totals = {"routed_n": 0.0, "routed_dis": 0.0, "audit_n": 0.0, "audit_dis": 0.0}
        self._step = dict.fromkeys(self.totals, 0.0)

    def add(self, routed: bool, audited: bool, pm_score: float, judge_score: float) -> None:
        """One judged pair: the PM's score d(x, y) and the judge's credit for x (1, 0.5, 0)."""
        disagreement = abs(float(pm_score > 0) - judge_score) if pm_score != 0 else 0.5
        for kind, on in (("routed", routed), ("audit", audited)):
            if on:
                self._step[f"{kind}_n"] += 1
                self._step[f"{kind}_dis"] += disagreement

    def step_counts(self) -> list[float]:
        """This step's local sums, to be summed across ranks."""
        return [self._step[k] for k in self.totals]

    def close_step(self, global_counts: list[float]) -> None:
        """Adds the step's global sums to the totals and starts a new step."""
        for key, value in zip(self.totals, global_counts, strict=True):
            self.totals[key] += value
        self._step = dict.fromkeys(self.totals, 0.0)

    def metrics(self) -> dict[str, float]:
        t = self.totals
        if not t["audit_n"]:
            return {}
        audit_dis = t["audit_dis"] / t["audit_n"]
        out = {"audit/pairs": t["audit_n"], "audit/agreement": 1.0 - audit_dis}
        if t["routed_n"]:
            out["audit/routing_gain"] = t["routed_dis"] / t["routed_n"] - audit_dis
        return out

    def state_dict(self) -> dict:
        return dict(self.totals)

    def load_state_dict(self, state: dict) -> None:
        self.totals = {k: float(state.get(k, 0.0)) for k in self.totals}
