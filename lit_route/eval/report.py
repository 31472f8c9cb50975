"""Writing evaluation results: ``results.json``, ``curves.csv``, the plots and the console table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

ROUTERS = ("uncertainty", "random", "margin", "oracle")
CONTROLS = ("length", "learned")  # the length-only control (always), the learned router (with a delegation model)


def routers(results: dict) -> list[str]:
    """The routers whose curves ``results`` holds, in table order."""
    return [r for r in (*ROUTERS, *CONTROLS) if r in results["curves"]]


def write_curves_csv(path: Path, results: dict) -> None:
    curves = results["curves"]
    names = routers(results)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fraction", *names, "judge_seconds", "judge_tokens"])
        for i, f in enumerate(results["fractions"]):
            writer.writerow([f, *(round(curves[r][i], 6) for r in names),
                             round(results["judge_cost"]["seconds"][i], 3), results["judge_cost"]["tokens"][i]])


def console_table(results: dict, show=(0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)) -> str:
    fr = results["fractions"]
    names = routers(results)
    lines = [
        f"pairs: {results['n_pairs']}   PM alone: {results['pm_accuracy']:.3f}   judge alone: "
        f"{results['judge_accuracy']:.3f}   ECE: {results['metrics']['ece']:.3f}   "
        f"AUROC(ū→error): {results['metrics'].get('auroc_uncertainty', float('nan')):.3f}",
        "",
        f"{'judged':>8} " + " ".join(f"{r:>12}" for r in names),
    ]
    for f in show:
        i = min(range(len(fr)), key=lambda j: abs(fr[j] - f))
        lines.append(f"{fr[i] * 100:>7.0f}% " + " ".join(f"{results['curves'][r][i]:>12.3f}" for r in names))
    lines.append(f"{'AUC':>8} " + " ".join(f"{results['area_under_curve'][r]:>12.3f}" for r in names))
    if "routers" in results:
        lines.append("; ".join(f"{k}: {v}" for k, v in results["routers"].items()))
    if "intervals" in results:
        lines += ["", *interval_lines(results, show), *length_lines(results)]
    if "risk" in results:
        lines += ["", risk_line(results["risk"])]
    if results.get("cascade", {}).get("risk_escalation"):
        lines.append(escalation_line(results["cascade"]["risk_escalation"], results))
    if "cascade" in results:
        lines.append(f"cascade with {results['cascade']['cheap_judge']}: best accuracy at a share of the cost of "
                     f"judging every pair with {results.get('judge_model')}")
        for share, row in results["cascade"]["at_budget"].items():
            cells = "  ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in row.items() if k != "budget_usd")
            lines.append(f"{float(share) * 100:>7.0f}%  {cells}")
    failures = results["judge_stats"].get("failures") or {}
    lines.append(f"judge: {results['judge']}   failures: {failures or 'none'}   inconsistent pairs: "
                 f"{results['judge_inconsistent']}")
    return "\n".join(lines)


def _ci(iv: dict, *path) -> str:
    """``point [lo, hi]`` of one number of ``results["intervals"]`` ("—" where undefined)."""
    values = []
    for part in ("point", "lo", "hi"):
        v = iv[part]
        for key in path:
            v = v[key]
        values.append(v)
    return "—" if None in values else f"{values[0]:.3f} [{values[1]:.3f}, {values[2]:.3f}]"


def interval_lines(results: dict, show=(0.05, 0.1, 0.25, 0.5)) -> list[str]:
    """Intervals of the headline numbers and of the paired difference uncertainty − random per fraction."""
    iv, fr = results["intervals"], results["fractions"]
    lines = [f"{iv['level']:.0%} intervals, {iv['n_boot']} bootstrap redraws of {iv['units']} {iv['resampled']}s:",
             f"  AUROC(ū→error) {_ci(iv, 'auroc_uncertainty')}   ECE {_ci(iv, 'ece')}   recovered share of "
             f"(oracle − random) area on [0, {iv['upto']:.0%}] {_ci(iv, 'recovered_share')}",
             f"{'judged':>8} {'uncertainty':>22} {'random':>22} {'uncertainty − random':>24}"]
    for f in show:
        i = min(range(len(fr)), key=lambda j: abs(fr[j] - f))
        sep = {1: "above", -1: "below", 0: "not separated"}[iv["separated"][i]]
        lines.append(f"{fr[i] * 100:>7.0f}% {_ci(iv, 'curves', 'uncertainty', i):>22} {_ci(iv, 'curves', 'random', i):>22} "
                     f"{_ci(iv, 'difference_uncertainty_random', i):>24}  {sep}")
    return lines


def length_lines(results: dict) -> list[str]:
    """Each router's recovered share and its paired difference against the length-only control, with intervals
    (nothing when the intervals carry no length control)."""
    iv = results["intervals"]
    if "recovered_vs_length" not in iv["point"]:
        return []
    lines = [f"recovered share of the (oracle − random) area on [0, {iv['upto']:.0%}], and the paired difference "
             "against the length-only control:"]
    for name in iv["point"]["recovered"]:
        against = "" if name == "length" else f"   − length {_ci(iv, 'recovered_vs_length', name):>22}"
        lines.append(f"  {name:>12} {_ci(iv, 'recovered', name):>22}{against}")
    return lines


def risk_line(risk: dict) -> str:
    return (f"risk-controlled routing (α={risk['alpha']}, δ={risk['delta']}, {risk['splits']} calibration/test splits): "
            f"judged {risk['judged_fraction']:.1%} (range {risk['judged_fraction_range'][0]:.1%}–"
            f"{risk['judged_fraction_range'][1]:.1%}), disagreement left to the PM {risk['disagreement_left']:.3f}, "
            f"≤ α in {risk['held']:.1%} of splits (needs ≥ {1 - risk['delta']:.0%}); accuracy {risk['accuracy']:.3f} "
            f"vs random at the same calls {risk['random_accuracy_same_calls']:.3f}")


def escalation_line(esc: dict, results: dict) -> str:
    return (f"cascade escalation by the cheap judge's bidirectional entropy (α={esc['alpha']}, δ={esc['delta']}, "
            f"{esc['splits']} splits): {esc['judged_fraction']:.1%} of its verdicts escalated to "
            f"{results.get('judge_model')}, disagreement kept {esc['disagreement_left']:.3f}, ≤ α in {esc['held']:.1%} "
            f"of splits; accuracy {esc['accuracy']:.3f} vs random escalation {esc['random_accuracy_same_calls']:.3f}")


def markdown_table(results: dict, show=(0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)) -> str:
    """``results.md``: accuracy per router and budget with intervals, and the paired difference."""
    fr, iv = results["fractions"], results.get("intervals")
    names = routers(results)
    cell = (lambda *path: _ci(iv, *path)) if iv else None
    against = [r for r in names if iv and r in iv["point"].get("difference_vs_length", {})]
    head = ["judged", *names] + (["uncertainty − random"] if iv else []) + [f"{r} − length" for r in against]
    lines = [f"{_short_label(results['benchmark'])}: {results['n_pairs']} pairs, judge {results.get('judge_model')}; "
             f"PM alone {results['pm_accuracy']:.3f}, judge alone {results['judge_accuracy']:.3f}"
             + (f"; {iv['level']:.0%} intervals over {iv['n_boot']} bootstrap redraws of {iv['resampled']}s" if iv else ""),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in show:
        i = min(range(len(fr)), key=lambda j: abs(fr[j] - f))
        cells = [cell("curves", r, i) if iv else f"{results['curves'][r][i]:.3f}" for r in names]
        if iv:
            cells.append(cell("difference_uncertainty_random", i))
        cells += [cell("difference_vs_length", r, i) for r in against]
        lines.append(f"| {fr[i]:.0%} | " + " | ".join(cells) + " |")
    if iv:
        lines += ["", f"AUROC(ū→error) {cell('auroc_uncertainty')}; ECE {cell('ece')}; recovered share of the "
                  f"(oracle − random) area on [0, {iv['upto']:.0%}] {cell('recovered_share')}."]
        if "recovered_vs_length" in iv["point"]:
            lines += ["", "| router | recovered share [0, " + f"{iv['upto']:.0%}] | − length (paired) |", "|---|---|---|"]
            lines += [f"| {r} | {cell('recovered', r)} | {'—' if r == 'length' else cell('recovered_vs_length', r)} |"
                      for r in iv["point"]["recovered"]]
        if "routers" in results:
            lines += ["", "; ".join(f"{k}: {v}" for k, v in results["routers"].items()) + "."]
    if "risk" in results:
        lines += ["", risk_line(results["risk"]) + "."]
    esc = results.get("cascade", {}).get("risk_escalation")
    if esc:
        lines += ["", escalation_line(esc, results) + "."]
    return "\n".join(lines) + "\n"


def _short_label(benchmark: str) -> str:
    """``a/b/Natural.json, a/b/Other.json, ...`` -> ``Natural + 4 more`` (a plot title must fit)."""
    stems = [Path(part.strip().split(":")[-1]).name.split(".")[0] for part in benchmark.split(",")]
    return stems[0] if len(stems) == 1 else f"{stems[0]} + {len(stems) - 1} more"


def plot(results: dict, output_dir: Path) -> list[str]:
    """Writes ``routing_curve.png`` and ``by_decile.png``; returns their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fr = [100 * f for f in results["fractions"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"uncertainty": ("C0", "-"), "random": ("C1", "--"), "margin": ("C2", "-."), "oracle": ("C3", ":"),
              "length": ("C7", (0, (5, 1, 1, 1))), "learned": ("C4", "-")}
    for name in routers(results):
        color, ls = styles[name]
        ax.plot(fr, results["curves"][name], linestyle=ls, color=color,
                label=f"{name} (AUC {results['area_under_curve'][name]:.3f})")
        if "intervals" in results and name in ("uncertainty", "random"):
            lo, hi = results["intervals"]["lo"]["curves"][name], results["intervals"]["hi"]["curves"][name]
            ax.fill_between(fr, lo, hi, color=color, alpha=0.15, lw=0)
    ax.axhline(results["judge_accuracy"], color="grey", lw=0.8, ls=":",
               label=f"judge alone ({results['judge_accuracy']:.3f})")
    ax.plot([0], [results["pm_accuracy"]], "ko", ms=5, label=f"PM alone ({results['pm_accuracy']:.3f})")
    ax.set_xlabel("pairs sent to the judge (%)")
    curve_path = _finish(fig, ax, f"{_short_label(results['benchmark'])} (n={results['n_pairs']}) · judge "
                         f"{results.get('judge_model', results['judge'])}", output_dir / "routing_curve.png", plt)

    dec = results["by_decile"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = list(range(1, len(dec["pm_accuracy"]) + 1))
    ax.bar([i - 0.2 for i in x], [v if v is not None else 0.0 for v in dec["pm_accuracy"]], width=0.4, label="PM")
    ax.bar([i + 0.2 for i in x], [v if v is not None else 0.0 for v in dec["judge_accuracy"]], width=0.4,
           label="judge")
    ax.set_xlabel("uncertainty decile (1 = most certain)")
    ax.set_ylabel("accuracy")
    ax.set_xticks(x)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"{_short_label(results['benchmark'])} (n={results['n_pairs']}): accuracy by PM uncertainty · "
                 f"judge {results.get('judge_model', results['judge'])}", fontsize=9)
    fig.tight_layout()
    decile_path = output_dir / "by_decile.png"
    fig.savefig(decile_path, dpi=120)
    plt.close(fig)
    paths = [str(curve_path), str(decile_path)]
    if "intervals" in results:
        paths.append(_plot_difference(results, output_dir, plt))
    if "cascade" in results:
        paths.append(_plot_cascade(results, output_dir, plt))
    return paths


def _plot_difference(results: dict, output_dir: Path, plt) -> str:
    """``difference.png``: accuracy of uncertainty routing minus random routing at each budget, with its band."""
    iv = results["intervals"]
    fr = [100 * f for f in results["fractions"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(fr, iv["point"]["difference_uncertainty_random"], "-", color="C0", label="uncertainty − random")
    ax.fill_between(fr, iv["lo"]["difference_uncertainty_random"], iv["hi"]["difference_uncertainty_random"],
                    color="C0", alpha=0.2, lw=0, label=f"{iv['level']:.0%} interval ({iv['resampled']} bootstrap)")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("pairs sent to the judge (%)")
    path = _finish(fig, ax, f"{_short_label(results['benchmark'])} (n={results['n_pairs']}): paired difference",
                   output_dir / "difference.png", plt)
    return str(path)


def _plot_cascade(results: dict, output_dir: Path, plt) -> str:
    cas = results["cascade"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    strong, cheap = results.get("judge_model", "strong"), cas["cheap_judge"]
    ax.plot(cas["strong_only"]["cost"], cas["strong_only"]["accuracy"], "-", label=f"PM → {strong}")
    ax.plot(cas["cheap_only"]["cost"], cas["cheap_only"]["accuracy"], "--", label=f"PM → {cheap}")
    front = cas["bands_frontier"]
    ax.plot([p["cost"] for p in front], [p["accuracy"] for p in front], "-o", ms=2.5,
            label=f"PM → {cheap} → {strong} (bands, best)")
    ax.plot(cas["escalate"]["cost"], cas["escalate"]["accuracy"], "-.",
            label=f"PM → {cheap}, unsure → {strong}")
    ax.plot([0], [results["pm_accuracy"]], "ko", ms=5, label=f"PM alone ({results['pm_accuracy']:.3f})")
    ax.set_xlabel("judge cost (USD, estimated)")
    return str(_finish(fig, ax, f"{_short_label(results['benchmark'])} (n={results['n_pairs']}): accuracy against "
                       "judge cost", output_dir / "cost_curve.png", plt, legend_size=7))


def _finish(fig, ax, title: str, path: Path, plt, legend_size: int = 8) -> Path:
    """Accuracy axis, title, grid, legend; saved to ``path`` and closed."""
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: dict, output_dir: Path) -> dict[str, str]:
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": str(output_dir / "results.json"), "curves": str(output_dir / "curves.csv")}
    with open(paths["results"], "w") as fh:
        json.dump(results, fh, indent=2, allow_nan=False)  # strict JSON: a NaN here is a bug, not a value
    write_curves_csv(output_dir / "curves.csv", results)
    paths["table"] = str(output_dir / "results.md")
    Path(paths["table"]).write_text(markdown_table(results))
    for p in plot(results, output_dir):
        paths[Path(p).stem] = p
    return paths
