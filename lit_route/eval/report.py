"""Writing evaluation results: ``results.json``, ``curves.csv``, the plots and the console table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

ROUTERS = ("uncertainty", "random", "margin", "oracle")


def write_curves_csv(path: Path, results: dict) -> None:
    curves = results["curves"]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fraction", *ROUTERS, "judge_seconds", "judge_tokens"])
        for i, f in enumerate(results["fractions"]):
            writer.writerow([f, *(round(curves[r][i], 6) for r in ROUTERS),
                             round(results["judge_cost"]["seconds"][i], 3), results["judge_cost"]["tokens"][i]])


def console_table(results: dict, show=(0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)) -> str:
    fr = results["fractions"]
    lines = [
        f"pairs: {results['n_pairs']}   PM alone: {results['pm_accuracy']:.3f}   judge alone: "
        f"{results['judge_accuracy']:.3f}   ECE: {results['metrics']['ece']:.3f}   "
        f"AUROC(ū→error): {results['metrics'].get('auroc_uncertainty', float('nan')):.3f}",
        "",
        f"{'judged':>8} " + " ".join(f"{r:>12}" for r in ROUTERS),
    ]
    for f in show:
        i = min(range(len(fr)), key=lambda j: abs(fr[j] - f))
        lines.append(f"{fr[i] * 100:>7.0f}% " + " ".join(f"{results['curves'][r][i]:>12.3f}" for r in ROUTERS))
    lines.append(f"{'AUC':>8} " + " ".join(f"{results['area_under_curve'][r]:>12.3f}" for r in ROUTERS))
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
    styles = {"uncertainty": ("C0", "-"), "random": ("C1", "--"), "margin": ("C2", "-."), "oracle": ("C3", ":")}
    for name in ROUTERS:
        color, ls = styles[name]
        ax.plot(fr, results["curves"][name], ls, color=color, label=f"{name} (AUC {results['area_under_curve'][name]:.3f})")
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
    if "cascade" in results:
        paths.append(_plot_cascade(results, output_dir, plt))
    return paths


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
    for p in plot(results, output_dir):
        paths[Path(p).stem] = p
    return paths
