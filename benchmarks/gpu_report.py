"""The GPU check's Markdown report, from the JSON result ``gpu_check.py`` writes."""

from __future__ import annotations

import math


def fmt(value, digits: int = 3, pct: bool = False) -> str:
    """A number for a table cell (``—`` when missing or not a number)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if pct:
        return f"{100 * value:.1f}%"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def _pm_row(s: dict) -> str:
    if "median_step_s" not in s:
        return ""
    return (f"{s.get('pairs')} pairs × {s.get('length')} tokens (both orders): step {fmt(s['median_step_s'])} s, "
            f"{fmt(s.get('tokens_per_s'), 4)} tokens/s, MFU {fmt(s.get('mfu'), pct=True)} (HFU "
            f"{fmt(s.get('hfu'), pct=True)}), peak {fmt(s.get('peak_memory_gib'))} GiB allocated / "
            f"{fmt(s.get('peak_reserved_gib'))} GiB reserved; covariance pass: forward "
            f"{fmt(s.get('covariance_forward_s'))} s, finalize (D = {s.get('features')}, float64) "
            f"{fmt(s.get('finalize_s'))} s")


def _rloo_row(s: dict) -> str:
    stages = s.get("stage_s")
    if not stages:
        return ""
    parts = ", ".join(f"{k} {fmt(v)} s" for k, v in stages.items())
    return (f"{s.get('prompts')} prompts × K = {s.get('k')}, up to {s.get('new_tokens')} new tokens: step "
            f"{fmt(s.get('median_step_s'))} s ({parts}); {fmt(s.get('generation_tokens_per_s'), 4)} generated "
            f"tokens/s; peak {fmt(s.get('peak_memory_gib'))} GiB allocated; model folder written in "
            f"{fmt(s.get('write_model_s'))} s, policy and PM loaded in {fmt(s.get('load_s'))} s")


def _bf16_row(s: dict) -> str:
    checks = s.get("checks")
    if not checks:
        return ""
    return f"{sum(map(bool, checks.values()))} of {len(checks)} checks passed (table below)"


ROWS = {"pm_step": _pm_row, "rloo_step": _rloo_row, "bf16_checks": _bf16_row}


def markdown(result: dict) -> str:
    """The report: goals, one row per stage, the bf16-mixed comparisons, the checks."""
    dry = result["dry_run"]
    lines = [("GPU check, dry run: tiny shapes on the CPU (the numbers check the code, not the hardware)" if dry
              else "GPU check on random Llama-3-8B-shaped models") + f"; device: {result['device']}; "
             f"{result['date']}; {fmt(result['wall_s'])} s in all. All checks passed: {fmt(result['all_ok'])}.",
             "", "| goal | target | measured | met |", "|---|---|---|---|"]
    goals = result["goals"]
    mem, mfu = goals["pm_peak_memory_gib"], goals["mfu"]
    lines.append(f"| PM step peak memory ({mem.get('basis') or '—'}) | {mem['target']} GiB | "
                 f"{fmt(mem['measured'])} GiB | {fmt(mem['met'])} |")
    lines.append(f"| PM step MFU (peak {fmt(mfu.get('peak_tflops'))} TFLOP/s: {mfu.get('basis') or '—'}) | "
                 f"{mfu['target']} | {fmt(mfu['measured'], pct=True)} | {fmt(mfu['met'])} |")
    lines += ["", "| stage | status | wall s | result |", "|---|---|---|---|"]
    for name, s in result["stages"].items():
        text = ROWS[name](s)
        if s.get("status") != "ok":
            text = f"**{s.get('error', 'failed')}**" + (f"; before that: {text}" if text else "")
        lines.append(f"| {name} | {s.get('status')} | {fmt(s.get('wall_s'))} | {text.replace('|', '/')} |")
    agreement = result["stages"].get("bf16_checks", {}).get("agreement")
    if agreement:
        lines += ["", "bf16-mixed against float32 on the same weights:", "",
                  "| quantity | measured | limit | ok |", "|---|---|---|---|"]
        lines += [f"| {k} | {fmt(v['measured'])} | {fmt(v['limit'])} | {fmt(v['ok'])} |" for k, v in agreement.items()]
    lines += ["", "| check | passed |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in result["checks"].items()]
    return "\n".join(lines) + "\n"
