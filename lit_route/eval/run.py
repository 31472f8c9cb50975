"""``lit-route evaluate``: score a benchmark with the PM, judge every pair once, and draw the routing curves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lit_route.artefacts.provenance import judge_label, provenance
from lit_route.checks import check_choice, check_device, check_file_path, check_fraction, check_nonnegative
from lit_route.data.readers import load_pairs
from lit_route.eval.cascade import bidirectional_entropy, cascade_report
from lit_route.eval.controls import DEFAULT_LENGTH_BY, LENGTH_BY, length_priority, response_lengths
from lit_route.eval.curves import (
    area_under_curve,
    curve_for_order,
    margin_order,
    oracle_order,
    random_expected_curve,
    uncertainty_order,
)
from lit_route.eval.export import write_judged_pairs
from lit_route.eval.report import console_table, write_results
from lit_route.eval.scores import read_scores, write_scores
from lit_route.eval.stats import cluster_ids, expected_curve_at, risk_split_test, routing_intervals
from lit_route.eval.stats import risk_splits as split_risk
from lit_route.judges.base import JudgeBackend, check_judge
from lit_route.judges.cache import CachedJudge
from lit_route.judges.loop import run_sync
from lit_route.judges.pairwise import ORDERS, judge_pairs
from lit_route.preference.metrics import PreferenceMetrics
from lit_route.routing.risk import check_risk, risk_threshold
from lit_route.routing.routers import count_for_fraction
from lit_route.uncertainty.delegation import DelegationModel, delegation_signals

log = logging.getLogger(__name__)

# RewardBench's sections (subset -> section); used when the benchmark's subsets carry these names.
REWARDBENCH_SECTIONS = {
    **dict.fromkeys(["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"], "Chat"),
    **dict.fromkeys(["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                     "llmbar-adver-GPTOut", "llmbar-adver-manual"], "Chat Hard"),
    **dict.fromkeys(["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
                     "donotanswer"], "Safety"),
    **dict.fromkeys(["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"], "Reasoning"),
}


def _group_accuracy(groups: list[str], values: torch.Tensor) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for g, v in zip(groups, values.tolist(), strict=True):
        out.setdefault(g, []).append(v)
    return {g: sum(v) / len(v) for g, v in sorted(out.items())}


def evaluate(
    data: list[str] | str,
    judge: JudgeBackend,
    pm_ckpt: str | None = None,
    scores: str | None = None,
    output_dir: str = "runs/eval",
    format: str = "auto",
    skip_invalid: bool = False,
    limit_per_file: int | None = None,
    order: str = "both",
    cache: str | None = "runs/judge_cache.sqlite",
    fraction_step: float = 0.05,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
    max_failed_fraction: float = 0.1,
    progress: bool = True,
    cheap_judge: JudgeBackend | None = None,
    export_judged: str | None = None,
    export_fraction: float = 1.0,
    n_boot: int = 1000,
    bootstrap_by: str = "auto",
    interval_level: float = 0.95,
    risk_alpha: float | None = None,
    risk_delta: float = 0.1,
    risk_splits: int = 200,
    risk_calibration: str | None = None,
    length_by: str = DEFAULT_LENGTH_BY,
    delegation: str | None = None,
) -> dict:
    """Accuracy against judge budget for uncertainty, random, margin and oracle routing, the length-only control
    (``length``) and, with a delegation model, the learned router (``learned``).

    Args:
        data: Benchmark file(s), any supported format; ``bundled:<path>`` for shipped data.
        judge: The judge backend (``class_path`` + ``init_args``): ReplayJudge, AnthropicJudge,
            OpenAICompatibleJudge, HFLocalJudge, or any class with the members of ``JudgeBackend``.
        pm_ckpt: A finalised ``PreferenceModule`` checkpoint (or give ``scores``).
        scores: A ``lit-route pm score`` output to use instead of scoring with ``pm``.
        output_dir: Where results.json, curves.csv, scores.jsonl and the plots go.
        format: Reader of ``data``.
        skip_invalid: Skip (and count) malformed records.
        limit_per_file: Use at most this many pairs per file.
        order: Display order of the judge: ``both`` (default), ``random`` or ``fixed``.
        cache: sqlite verdict cache (``null`` disables it); a rerun pays no call twice.
        fraction_step: Spacing of the judge fractions (0, step, ..., 1).
        batch_size: Pairs per PM forward pass.
        device: Where the PM runs.
        seed: Seed of the ``random`` display order.
        max_failed_fraction: Share of pairs that may end without any verdict before the evaluation counts as
            failed (the results are written first, then the command exits non-zero).
        progress: Show progress bars while scoring and judging.
        cheap_judge: A cheaper judge for a cascade (PM → cheap judge → ``judge``): it judges every pair too, and
            ``results.json`` gains accuracy-against-cost curves of both judges alone and of their cascades
            (``cascade``), plotted in ``cost_curve.png``. Costs come from the judges' prices.
        export_judged: Write the pairs the judge decided (not ties, not failures) as a preference file
            (``prompt``, ``chosen``, ``rejected``: the judge's verdict is the label) for ``pm fit``.
        export_fraction: Export only the most uncertain share of pairs: those uncertainty routing judges at
            that budget.
        n_boot: Bootstrap redraws of the intervals (``results["intervals"]``); 0 skips them.
        bootstrap_by: Redraw ``pair``s or ``prompt``s (pairs of one prompt are not independent); ``auto``: by
            prompt when any prompt has more than one pair.
        interval_level: Coverage of the intervals.
        risk_alpha: Adds risk-controlled routing (``results["risk"]``): τ chosen on a random half of the pairs (by
            prompt) so that the PM's disagreement with the judge among the pairs it keeps is ≤ ``risk_alpha`` with
            probability ≥ 1 − ``risk_delta``, measured on the other half, over ``risk_splits`` splits. With a
            ``cheap_judge``, also ``results["cascade"]["risk_escalation"]``: the cheap judge's verdicts whose
            bidirectional preference entropy exceeds a τ chosen the same way go to ``judge``, so that the cheap
            judge's disagreement with ``judge`` on the verdicts it keeps is ≤ ``risk_alpha``.
        risk_delta: See ``risk_alpha``.
        risk_splits: See ``risk_alpha``.
        risk_calibration: A labelled calibration set instead of splits: a ``pm score`` file of other pairs (its
            ``uncertainty`` and ``correct``: the PM against the pairs' labels). τ is chosen on it once and applied
            to every evaluated pair (``results["risk"]["from_file"]``).
        length_by: How the length-only control ranks pairs (``sum``, ``max``, ``closest``, ``farthest``:
            :mod:`lit_route.eval.controls`). Every PM router's paired difference against it is in
            ``results["intervals"]`` (``difference_vs_length``, ``recovered_vs_length``).
        delegation: A :class:`~lit_route.uncertainty.delegation.DelegationModel` file: adds the ``learned``
            router, which judges the pairs of highest fitted ``P(PM wrong)`` first.
    """
    check_judge(judge)
    check_device("device", device)
    check_choice("order", order, ORDERS)
    check_fraction("fraction_step", fraction_step, open_low=True)
    check_fraction("max_failed_fraction", max_failed_fraction)
    check_nonnegative("batch_size", batch_size, integer=True, positive=True)
    check_fraction("export_fraction", export_fraction)
    check_file_path("cache", cache, "judge_cache.sqlite")
    check_file_path("export_judged", export_judged, "judged.jsonl")
    check_nonnegative("n_boot", n_boot, integer=True)
    check_choice("bootstrap_by", bootstrap_by, ("auto", "pair", "prompt"))
    check_fraction("interval_level", interval_level, open_low=True)
    check_nonnegative("risk_splits", risk_splits, integer=True, positive=True)
    check_choice("length_by", length_by, LENGTH_BY)
    learned = DelegationModel.load(delegation) if delegation is not None else None
    if risk_alpha is not None:
        check_risk("risk_", risk_alpha, risk_delta, "hb")
    # read before any judge call is paid for
    calibration = _read_calibration(risk_calibration) if risk_calibration is not None and risk_alpha else None
    if cheap_judge is not None:
        check_judge(cheap_judge, "cheap_judge")
    if (pm_ckpt is None) == (scores is None):
        raise ValueError("pm_ckpt: give exactly one of pm_ckpt (a checkpoint) or scores (a `pm score` file)")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = [data] if isinstance(data, str) else list(data)
    pairs = load_pairs(data, format, skip_invalid, limit_per_file)
    if scores is not None:
        d, u = read_scores(scores, pairs)
    else:
        from lit_route.preference.io import load_preference_model
        from lit_route.preference.scoring import score_pairs

        module, encoder = load_preference_model(pm_ckpt, device)
        d, u = score_pairs(module, pairs, encoder, batch_size=batch_size, progress=progress)
        write_scores(out_dir / "scores.jsonl", pairs, d, u)
    items = [(p.prompt_text(), p.chosen, p.rejected) for p in pairs]
    backend, judgements = _judge_all(judge, cache, items, order, seed, progress, "judging")
    pm_correct = (d > 0).double()
    judge_ok, raw_judge, judge_score = _credit(judgements, pm_correct)
    n = len(pairs)
    steps = round(1 / fraction_step)
    fractions = [round(i / steps, 6) for i in range(steps + 1)]
    orders = {
        "uncertainty": uncertainty_order(u),
        "margin": margin_order(d),
        "oracle": oracle_order(d, judge_score),
    }
    curves = {name: curve_for_order(o, pm_correct, judge_score, fractions) for name, o in orders.items()}
    curves["random"] = random_expected_curve(pm_correct, judge_score, fractions)
    len_a, len_b = response_lengths(pairs)
    priorities = {"length": length_priority(len_a, len_b, length_by)}
    if learned is not None:
        priorities["learned"] = learned.predict(delegation_signals(d, u, len_a, len_b))
    ks_all = torch.tensor([count_for_fraction(n, f) for f in fractions])
    for name, priority in priorities.items():
        curves[name] = expected_curve_at(priority, pm_correct, judge_score, ks_all).tolist()
    latency = torch.tensor([j.latency_s for j in judgements], dtype=torch.float64)[orders["uncertainty"]]
    tokens = torch.tensor([j.tokens for j in judgements], dtype=torch.long)[orders["uncertainty"]]
    usd = torch.tensor([j.verdict_cost_usd for j in judgements], dtype=torch.float64)[orders["uncertainty"]]
    ks = [count_for_fraction(n, f) for f in fractions]
    metrics = PreferenceMetrics()
    metrics.update(d, u)
    decile_of = torch.empty(n, dtype=torch.long)
    decile_of[torch.argsort(u.double(), stable=True)] = torch.arange(n) * 10 // n
    subsets = [p.subset for p in pairs]
    mask_at = {f: torch.zeros(n, dtype=torch.bool).index_fill_(0, orders["uncertainty"][: count_for_fraction(n, f)], True)
               for f in (0.1, 0.25, 0.5)}
    routed_credit = {f: torch.where(m, judge_score, pm_correct) for f, m in mask_at.items()}
    by_subset = {
        "pm": _group_accuracy(subsets, pm_correct),
        "judge": _group_accuracy(subsets, judge_score),
        **{f"uncertainty@{int(f * 100)}%": _group_accuracy(subsets, c) for f, c in routed_credit.items()},
    }
    results = {
        "benchmark": ", ".join(str(x) for x in data),
        "judge": judge_label(judge),
        "judge_model": str(getattr(judge, "model", judge_label(judge))),
        "order": order,
        "n_pairs": n,
        "routers": {"length": f"length-only control, by {length_by} of the two responses' characters",
                    **({"learned": f"P(PM wrong) of {delegation} from {', '.join(learned.signals)}"} if learned else {})},
        "fractions": fractions,
        "curves": curves,
        "area_under_curve": {k: area_under_curve(fractions, v) for k, v in curves.items()},
        "pm_accuracy": float(pm_correct.mean()),
        "judge_accuracy": float(judge_score.mean()),
        "judge_accuracy_raw": float(raw_judge[judge_ok].mean()) if bool(judge_ok.any()) else None,
        "judge_failed_pairs": int((~judge_ok).sum()),
        "judge_inconsistent": sum(j.inconsistent for j in judgements),
        "judge_cost": {
            "seconds": [float(latency[:k].sum()) for k in ks],
            "tokens": [int(tokens[:k].sum()) for k in ks],
            "usd": [float(usd[:k].sum()) for k in ks],
        },
        "judge_stats": backend.stats.summary(),
        "metrics": metrics.compute(with_uncertainty=True),
        "by_decile": {  # null for a decile with no pairs (fewer than 10 pairs)
            "pm_accuracy": [_mean(pm_correct[decile_of == i]) for i in range(10)],
            "judge_accuracy": [_mean(judge_score[decile_of == i]) for i in range(10)],
            "mean_uncertainty": [_mean(u[decile_of == i]) for i in range(10)],
        },
        "by_subset": by_subset,
        "provenance": provenance(pm_ckpt=pm_ckpt, data=data, judge=judge, scores=scores),
    }
    prompts = cluster_ids([p.prompt_text() for p in pairs])
    by_prompt = bootstrap_by == "prompt" or (bootstrap_by == "auto" and int(prompts.max()) + 1 < n if n else False)
    clusters = prompts if by_prompt else None
    if n_boot and n > 1:
        results["intervals"] = routing_intervals(d, u, judge_score, fractions, clusters, n_boot, interval_level, seed,
                                                 priorities=priorities)
    if risk_alpha is not None and n > 1:
        results["risk"] = risk_split_test(d, u, judge_score, risk_alpha, risk_delta, risk_splits, clusters=clusters,
                                          seed=seed)
        if risk_calibration is not None:
            results["risk"]["from_file"] = _risk_from_file(risk_calibration, calibration, risk_alpha, risk_delta, u,
                                                           pm_correct, judge_score)
    groups = _difficulty_groups(subsets)
    if groups:
        results["by_group"] = {name: {k: _group_accuracy(g, v) for k, v in
                                      (("pm", pm_correct), ("judge", judge_score),
                                       *((f"uncertainty@{int(f * 100)}%", c) for f, c in routed_credit.items()))}
                               for name, g in groups.items()}
    if cheap_judge is not None:
        cheap_backend, cheap = _judge_all(cheap_judge, cache, items, order, seed, progress, "cheap judge")
        _, _, cheap_score = _credit(cheap, pm_correct)
        results["cascade"] = cascade_report(
            orders["uncertainty"], u, pm_correct, judge_score, cheap_score,
            torch.tensor([j.verdict_cost_usd for j in judgements], dtype=torch.float64),
            torch.tensor([j.verdict_cost_usd for j in cheap], dtype=torch.float64),
            torch.tensor([j.score is None or j.inconsistent for j in cheap]), fractions)
        results["cascade"]["cheap_judge"] = str(getattr(cheap_judge, "model", judge_label(cheap_judge)))
        results["cascade"]["cheap_accuracy"] = float(cheap_score.mean())
        results["cascade"]["cheap_judge_stats"] = cheap_backend.stats.summary()
        if risk_alpha is not None and n > 1:  # escalate the cheap judge's unsure verdicts, at a controlled risk
            entropy = torch.tensor([bidirectional_entropy(j) for j in cheap], dtype=torch.float64)
            results["cascade"]["risk_escalation"] = {
                "ranked_by": "bidirectional preference entropy of the cheap judge",
                **split_risk(entropy, (cheap_score - judge_score).abs(), cheap_score, judge_score, risk_alpha,
                             risk_delta, risk_splits, clusters=clusters, seed=seed)}
    if export_judged is not None:
        top = orders["uncertainty"][: count_for_fraction(n, export_fraction)].tolist()
        results["exported_pairs"] = write_judged_pairs(export_judged, [pairs[i] for i in top],
                                                       [judgements[i].score for i in top],
                                                       results["judge_model"])
    paths = write_results(results, out_dir)
    print(console_table(results))
    print("written: " + ", ".join(paths.values()))
    failed = results["judge_failed_pairs"]
    if n and failed / n > max_failed_fraction:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(results["judge_stats"]["failures"].items())) or "errors"
        raise RuntimeError(f"judge: {failed} of {n} pairs got no verdict ({reasons}), more than "
                           f"max_failed_fraction={max_failed_fraction}; results written to {out_dir}")
    return results


def _read_calibration(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled ``pm score`` file -> (ū, loss) (M,) each, loss 1 where the PM is wrong."""
    cal_u, cal_loss = [], []
    with open(path) as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    value = float(row["uncertainty"])
                    correct = bool(row["correct"]) if "correct" in row else float(row["score"]) > 0
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"{path}:{number}: not a score line with uncertainty and correct ({err})") from err
                if not math.isfinite(value):
                    raise ValueError(f"{path}:{number}: field 'uncertainty': not a finite number ({value})")
                cal_u.append(value)
                cal_loss.append(0.0 if correct else 1.0)
    if not cal_u:
        raise ValueError(f"risk_calibration: {path} has no score lines")
    return torch.tensor(cal_u, dtype=torch.float64), torch.tensor(cal_loss, dtype=torch.float64)


def _risk_from_file(path: str, calibration, alpha: float, delta: float, u, pm_correct, judge_score) -> dict:
    """τ chosen on a labelled calibration set (``calibration``: ū and loss), applied to the evaluated pairs."""
    cal_u, cal_loss = calibration
    choice = risk_threshold(cal_u, cal_loss, alpha, delta)
    tau = choice.tau if choice.tau is not None else -math.inf
    judged = u.double() > tau
    left = ~judged
    return {"calibration": path, "calibration_pairs": cal_u.numel(), "tau": choice.tau,
            "judged_fraction": float(judged.double().mean()),
            "disagreement_left": float((pm_correct - judge_score).abs()[left].mean()) if bool(left.any()) else 0.0,
            "accuracy": float(torch.where(judged, judge_score, pm_correct).mean())}


def _judge_all(judge, cache, items, order, seed, progress, desc):
    backend = CachedJudge(judge, cache) if cache else judge
    with tqdm(total=len(items) * (2 if order == "both" else 1), desc=desc, unit="call", disable=not progress) as bar:
        return backend, run_sync(judge_pairs(backend, items, order=order, seed=seed, on_verdict=bar.update))


def _credit(judgements, pm_correct: torch.Tensor):
    """``(answered, raw credit, credit)``: a failed verdict leaves the PM's answer."""
    ok = torch.tensor([j.score is not None for j in judgements])
    raw = torch.tensor([j.score if j.score is not None else 0.0 for j in judgements], dtype=torch.float64)
    return ok, raw, torch.where(ok, raw, pm_correct)


def _mean(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def _difficulty_groups(subsets: list[str]) -> dict[str, list[str]]:
    """RM-Bench difficulty (``domain/hard``) and RewardBench sections, where the subsets carry them."""
    groups = {}
    if all("/" in s and s.rsplit("/", 1)[1] in ("hard", "normal", "easy") for s in subsets):
        groups["rmbench_difficulty"] = [s.rsplit("/", 1)[1] for s in subsets]
    if any(s in REWARDBENCH_SECTIONS for s in subsets):
        groups["rewardbench_section"] = [REWARDBENCH_SECTIONS.get(s, "other") for s in subsets]
    return groups


def evaluate_cli(args: list[str], run: bool = True):
    """``lit-route evaluate --config CONFIG [--output_dir ...]``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lit-route evaluate", parser_mode="omegaconf", default_env=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(evaluate)
    cfg = parser.parse_args(args)
    if not run:
        return cfg
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    parser.save(cfg, str(Path(cfg.output_dir) / "config.yaml"), overwrite=True)
    init = parser.instantiate(cfg)
    kwargs = {k: v for k, v in init.items() if k not in ("config", "__path__")}
    return evaluate(**kwargs)
