"""Routing on the pairs an RLOO run actually samples: the reward accuracy each router would give at equal calls.

The offline tables (``routing_vs_length.py``) score fixed pairs; a routed RLOO run scores the policy's own
samples, whose mix of errors drifts as the policy learns. Here every upper-triangle pair of every step of a run
is recorded (:class:`PairLog`, added to each arm by ``rlhf_downstream.py``): the PM's score ``d`` (> 0: the PM
prefers the first completion), its uncertainty ``ū``, the two completions' lengths (characters) and the task's
verifier's label (``A``, ``B`` or ``tie``). The verifier is free, so the counterfactual of every router is exact
on the very same pairs: the reward's answer on a pair is the PM's, except on the top ``k`` of the step's pairs
by the router's priority, where it is the verifier's (``k`` = the share judged of the step's pairs, as the
routing callback counts it). Routers (higher priority judged first, ties at random in expectation):

- ``pm_only`` (nothing judged) and ``oracle`` (the PM's errors first), the bounds;
- ``random`` (the expected value of a random draw);
- ``uncertainty`` (highest ū), ``margin`` (smallest |d|), ``learned_pm`` (P(PM wrong) from |d| and log ū, the
  delegation model ``routing_vs_length.py`` fits on the validation prompts and saves);
- ``length`` (the length-only control, ``lit_route.eval.controls``, the variant chosen on validation).

Reward accuracy is counted on the pairs the verifier decides (one completion passes, the other fails): the share
of them whose reward prefers the passing one. A tie pair counts in the step's pairs (a router may spend a call on
it) but not in the accuracy. Pooled over steps and seeds: the summed expected right answers over the summed
decided pairs. 95% intervals: percentile bootstrap over (seed, step), the unit a routing decision is made on,
each redraw the same for every router (paired differences).

    python benchmarks/onpolicy_routing.py --pairs runs/onpolicy/runs/uncertainty-s*/pairs.jsonl \\
        --delegation runs/routing_vs_length/delegation-learned_pm.json --length-by closest
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch

from lit_route.eval.controls import DEFAULT_LENGTH_BY, length_priority
from lit_route.eval.stats import bootstrap, expected_curve_at
from lit_route.rewards.pairwise import upper_pairs
from lit_route.routing.plan import prompt_text
from lit_route.routing.routers import count_for_fraction
from lit_route.uncertainty.delegation import DelegationModel, delegation_signals

FRACTIONS = (0.1, 0.25, 0.5)
ROUTERS = ("pm_only", "random", "uncertainty", "margin", "learned_pm", "length", "oracle")
LABEL = {"A": 1, "B": -1, "tie": 0}


class PairLog(L.Callback):
    """Appends every upper-triangle pair of each batch, with the verifier's label, to a JSONL file.

    One line per pair: ``batch`` (the run's count of sampled batches, the unit a routing decision is made on),
    ``step``, ``group`` (the prompt's index in the batch), ``i``, ``j``, ``d`` (the PM's ``S_ij``, untouched by
    any judge), ``u`` (``U_ij``), ``len_i``, ``len_j`` (characters), ``label`` (``verifier(prompt, c_i, c_j)``).

    Args:
        path: The JSONL file (created, or appended to).
        verifier: ``package.module:function`` of ``(prompt, a, b) -> "A" | "B" | "tie"``.
    """

    def __init__(self, path: str, verifier: str = "lit_route.tasks.verify:judge_pair"):
        from lit_route.judges.function import import_callable

        self.path = Path(path)
        self.verifier = import_callable(verifier, "verifier")
        self.batches = 0

    def on_pairwise_scores(self, trainer, module, ctx) -> None:
        ii, jj = upper_pairs(ctx.pm_scores.shape[1])
        lines = []
        for g, completions in enumerate(ctx.completions):
            text = prompt_text(ctx.prompts[g])
            for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
                a, b = completions[i], completions[j]
                lines.append({"batch": self.batches, "step": trainer.global_step, "group": g, "i": i, "j": j,
                              "d": float(ctx.pm_scores[g, i, j]), "u": float(ctx.uncertainty[g, i, j]),
                              "len_i": len(a), "len_j": len(b), "label": self.verifier(text, a, b)})
        self.batches += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:  # appended per batch: a killed run keeps its pairs
            fh.writelines(json.dumps(r) + "\n" for r in lines)

    def on_before_rewards(self, trainer, module, ctx) -> None:
        """Nothing: the rewards are not this callback's to change."""


def read_steps(path: str | Path) -> list[dict[str, torch.Tensor]]:
    """The batches of one :class:`PairLog` file, in order: each ``{"d", "u", "len_i", "len_j", "label"}`` (P,)
    tensors (label +1 for ``A``, −1 for ``B``, 0 for a tie)."""
    by_batch: dict[int, list[dict]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
            if row["label"] not in LABEL:
                raise ValueError(f"label {row['label']!r} is not one of {list(LABEL)}")
            by_batch.setdefault(int(row["batch"]), []).append(row)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{n}: not a pair record ({err})") from err
    return [{"d": torch.tensor([r["d"] for r in rows], dtype=torch.float64),
             "u": torch.tensor([r["u"] for r in rows], dtype=torch.float64),
             "len_i": torch.tensor([float(r["len_i"]) for r in rows], dtype=torch.float64),
             "len_j": torch.tensor([float(r["len_j"]) for r in rows], dtype=torch.float64),
             "label": torch.tensor([LABEL[r["label"]] for r in rows], dtype=torch.long)}
            for _, rows in sorted(by_batch.items())]


def expected_right(priority: torch.Tensor, d: torch.Tensor, label: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Expected number of decided pairs the reward gets right when the ``k`` pairs of highest ``priority`` take
    the verifier's answer, for each ``k`` in ``ks`` (F,).

    A decided pair (``label`` ±1) is right under the PM when ``sign(d) = label`` (``d = 0`` is wrong) and always
    right once judged; a tie pair (``label`` 0) is never counted, judged or not, but takes its place in the order.

    Args:
        priority: (P,) higher judged first; ties broken uniformly at random (in expectation).
        d: (P,) the PM's scores.
        label: (P,) long, +1, −1 or 0.
        ks: (F,) long, pairs judged.

    Returns:
        (F,) float64.
    """
    decided = (label != 0).double()
    pm_right = ((torch.sign(d) == label.double()) & (label != 0)).double()
    # expected_curve_at averages over all P pairs: times P, the expected count
    return expected_curve_at(priority, pm_right, decided, ks) * label.numel()


def priorities(step: Mapping[str, torch.Tensor], model: DelegationModel | None,
               length_by: str) -> dict[str, torch.Tensor]:
    """Each router's priority (P,) on one batch's pairs (``learned_pm`` only with a ``model``)."""
    d, u, label = step["d"], step["u"], step["label"]
    wrong = ((label != 0) & (torch.sign(d) != label.double())).double()
    out = {"pm_only": torch.zeros_like(d), "random": torch.zeros_like(d), "uncertainty": u, "margin": -d.abs(),
           "length": length_priority(step["len_i"], step["len_j"], length_by), "oracle": wrong}
    if model is not None:
        out["learned_pm"] = model.predict(delegation_signals(d, u))
    return out


def step_table(steps: Sequence[Mapping[str, torch.Tensor]], routers: Sequence[str], model: DelegationModel | None,
               length_by: str, fractions: Sequence[float] = FRACTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected right answers (S, R, F) of each router at each judged share, and decided pairs (S,), per batch."""
    right = torch.zeros(len(steps), len(routers), len(fractions), dtype=torch.float64)
    decided = torch.zeros(len(steps), dtype=torch.float64)
    for s, step in enumerate(steps):
        n = step["d"].numel()
        ks = torch.tensor([count_for_fraction(n, f) for f in fractions])
        prio = priorities(step, model, length_by)
        for r, name in enumerate(routers):
            right[s, r] = expected_right(prio[name], step["d"], step["label"],
                                         torch.zeros_like(ks) if name == "pm_only" else ks)
        decided[s] = float((step["label"] != 0).sum())
    return right, decided


def pooled_accuracy(right: torch.Tensor, decided: torch.Tensor) -> torch.Tensor:
    """Reward accuracy (R, F) pooled over the batches of ``right`` (S, R, F) and ``decided`` (S,) (NaN: none
    decided)."""
    total = decided.sum()
    return right.sum(0) / total if float(total) > 0 else torch.full(right.shape[1:], float("nan"), dtype=torch.float64)


def analyse(runs: Mapping[str, Sequence[Mapping[str, torch.Tensor]]], model: DelegationModel | None,
            length_by: str = DEFAULT_LENGTH_BY, fractions: Sequence[float] = FRACTIONS, n_boot: int = 1000,
            seed: int = 0) -> dict:
    """Pooled accuracy of every router, its difference against random and against ``length``, per judged share,
    each ``{"mid", "lo", "hi"}`` (95% percentile bootstrap over the (run, batch) units); the per-run points.

    Args:
        runs: One entry per run (seed): its batches, as :func:`read_steps` gives them.
        model: The ``learned_pm`` delegation model (``None``: that router is left out).
        length_by: The length control's variant.
        fractions: Shares of each batch's pairs judged.
        n_boot: Bootstrap redraws of the batches.
        seed: Seed of the redraws.
    """
    routers = [r for r in ROUTERS if model is not None or r != "learned_pm"]
    tables = {name: step_table(steps, routers, model, length_by, fractions) for name, steps in runs.items()}
    right = torch.cat([t[0] for t in tables.values()])
    decided = torch.cat([t[1] for t in tables.values()])
    at_random, at_length = routers.index("random"), routers.index("length")

    def stat(idx: torch.Tensor) -> torch.Tensor:
        acc = pooled_accuracy(right[idx], decided[idx])
        return torch.stack([acc, acc - acc[at_random], acc - acc[at_length]])  # (3, R, F)

    boot = bootstrap(stat, right.shape[0], n_boot, seed=seed)
    labels = [f"{round(100 * f)}%" for f in fractions]

    def block(k: int) -> dict:
        return {r: {lab: {"mid": float(boot["point"][k, ri, fi]), "lo": float(boot["lo"][k, ri, fi]),
                          "hi": float(boot["hi"][k, ri, fi])} for fi, lab in enumerate(labels)}
                for ri, r in enumerate(routers)}

    per_run = {name: {r: {lab: float(a) for lab, a in zip(labels, row, strict=True)}
                      for r, row in zip(routers, pooled_accuracy(*t).tolist(), strict=True)}
               for name, t in tables.items()}
    pairs = sum(int(s["d"].numel()) for steps in runs.values() for s in steps)
    return {"routers": routers, "length_by": length_by, "n_boot": n_boot, "seed": seed,
            "n": {"seeds": len(runs), "steps": int(right.shape[0]), "pairs": pairs, "decided_pairs": int(decided.sum())},
            "accuracy": block(0), "minus_random": block(1), "minus_length": block(2), "per_run": per_run}


def headline(block: dict, best: str, share: str = "25%") -> dict:
    """The numbers the summary carries: the chosen router's and ū's gain over random and difference against the
    length control at ``share`` judged."""
    out = {"router": best, "share": share, "n": block["n"]}
    for name in dict.fromkeys((best, "uncertainty")):
        out[name] = {"minus_random": block["minus_random"][name][share],
                     "minus_length": block["minus_length"][name][share]}
    return out


def main(argv: list[str] | None = None) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import routing_vs_length as rvl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", required=True, help="PairLog files, one per run (seed)")
    parser.add_argument("--delegation", default=None, help="the learned_pm model file (routing_vs_length.py)")
    parser.add_argument("--length-by", default=None, help="default: the variant chosen on validation in --results")
    parser.add_argument("--results", default="benchmarks/results/routing_vs_length.json",
                        help="routing_vs_length's results: the block goes under 'on_policy', the table into its .md")
    parser.add_argument("--arm", default="uncertainty", help="the arm whose runs sampled the pairs (recorded)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results_path = Path(args.results)
    try:
        results = json.loads(results_path.read_text())
        model = DelegationModel.load(args.delegation) if args.delegation else None
        runs = {str(p): read_steps(p) for p in args.pairs}
    except (OSError, ValueError, json.JSONDecodeError) as err:
        parser.exit(1, f"error: {err}\n")
    validation = results.get("validation", {})
    length_by = args.length_by or validation.get("length_by", DEFAULT_LENGTH_BY)
    block = analyse(runs, model, length_by, n_boot=args.n_boot, seed=args.seed)
    best = validation.get("best_pm_router", "uncertainty")
    if best not in block["routers"]:
        best = "uncertainty"
    block.update({"arm": args.arm, "delegation": args.delegation, "pairs_files": list(runs),
                  "headline": headline(block, best)})
    # how steady the gain is across runs (seeds): each run's own point, no interval
    block["per_run_minus_random_25%"] = {r: [v[r]["25%"] - v["random"]["25%"] for v in block["per_run"].values()]
                                         for r in block["routers"]}
    results["on_policy"] = block
    rvl.write(results, results_path.parent)
    print(json.dumps(block["headline"], indent=2))
    print("per-run gain over random at 25%:", {r: [round(x, 3) for x in v] for r, v in
                                               block["per_run_minus_random_25%"].items()},
          "mean", {r: round(statistics.fmean(v), 3) for r, v in block["per_run_minus_random_25%"].items()})
    return block


if __name__ == "__main__":
    main()
