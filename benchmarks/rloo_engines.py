"""Rollout engines on the RLOO step: ``lean``, ``hf`` and colocated ``vllm`` (merged-weight and adapter sync).

For each shape (prompts × K) and completion limit, every engine runs ``--steps`` RLOO steps of SmolLM2-135M-
Instruct with LoRA r=8 on q/k/v/o of the top 4 layers (the settings of ``rloo_vs_trl.py``: temperature 0.9,
top-p 0.95, lr 5e-5, β 0.05), each run in its own process (vLLM holds one engine per process, and so no run
inherits another's threads or caches). Runs are interleaved (lean, hf, vllm-merged, vllm-adapter, lean, ...)
``--repeats`` times; the first step of a run is warm-up; medians over the rest. Reported per run: the generation
stage (engine sync included: what the trainer waits for), the whole step, the sync alone, completion tokens per
second of generation, the mean completion length, the engine–trainer log-prob gap, and the engine's start-up.
With ``--trl``, TRL's RLOOTrainer runs beside them at the same shape, tokens, LoRA and precision: with its HF
``generate`` (``trl-hf``), with its own colocated vLLM path as shipped (``trl-vllm``; recorded as an error when it
fails on this vLLM build), and with that path's weight push done by vLLM's ``reload_weights`` (``trl-vllm-reload``:
TRL 1.16's per-tensor ``load_weights`` cannot write into weights vLLM's CPU backend has repacked, which it does
wherever oneDNN is available); a table of our fastest step against each, per step and per generated token.

Goal on a CPU (issue 21): vllm generation, sync included, ≤ 0.75x lean at 8×4×128; the step ≤ 0.6x TRL's.

    python benchmarks/rloo_engines.py --pm_ckpt runs/pm_smollm2_sngp/finalized.ckpt            # the full grid
    python benchmarks/rloo_engines.py --shapes 2x2 --completions 8 --steps 2 --repeats 1        # smallest

Without ``--pm_ckpt`` the reward is an untrained PM on the tiny built-in model (the generation stage is the same;
the step is then cheaper than a real one). Needs ``pip install -e '.[vllm,bench]'`` (see docs/engines.md).
Writes benchmarks/results/rloo_engines.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {"lean": ("lean", None), "hf": ("hf", None), "vllm-merged": ("vllm", "merged"),
        "vllm-adapter": ("vllm", "adapter")}


def child(spec: dict) -> dict:
    """One run in this process: ``spec`` = engine, sync, prompts, k, completion, steps, pm_ckpt."""
    import lightning as L
    from common import StepTimer
    from rloo_vs_trl import SMOL, TARGETS, bench_prompts

    from lit_route.models.backbone import BackboneSpec, LoraSpec
    from lit_route.policy.data import PromptDataModule
    from lit_route.policy.module import RLOOPolicyModule
    from lit_route.policy.sampling import EngineOptions, GenerationConfig

    L.seed_everything(0)
    engine, sync = RUNS[spec["run"]]
    generation = GenerationConfig(num_samples=spec["k"], max_new_tokens=spec["completion"], temperature=0.9,
                                  top_p=0.95, engine=engine, engine_options=EngineOptions(sync=sync or "auto"))
    pm = {"pm_ckpt": spec["pm_ckpt"]} if spec["pm_ckpt"] else {"pm_backbone": BackboneSpec()}
    module = RLOOPolicyModule(policy=SMOL, lora=LoraSpec(r=8, alpha=16, target_modules=TARGETS, top_layers=4),
                              generation=generation, beta=0.05, lr=5e-5, pm_batch_size=12, **pm)
    started = time.perf_counter()
    startup = 0.0
    if engine == "vllm":
        _ = module.engine  # start it outside the timed steps
        startup = time.perf_counter() - started
    steps = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, m, *args):
            steps.append(dict(m.last_step))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.txt"
        path.write_text("\n".join(p.replace("\n", " ") for p in bench_prompts(spec["prompts"] * spec["steps"])))
        timer = StepTimer()
        trainer = L.Trainer(max_steps=spec["steps"], accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, Keep()])
        trainer.fit(module, PromptDataModule(prompts=str(path), batch_size=spec["prompts"], max_prompt_tokens=256))
    measured = steps[1:] or steps
    times = timer.times[1:] or timer.times
    n = spec["prompts"] * spec["k"]

    def med(key):
        values = [s[key] for s in measured if key in s]
        return statistics.median(values) if values else None

    gen = med("time/generation")
    return {**spec, "step_s": statistics.median(times), "steps_s": timer.times, "generation_s": gen,
            "step_tokens": [n * s["response/length"] for s in steps], "sync_s": med("time/engine_sync"),
            "mean_completion_tokens": med("response/length"),
            "tokens_per_s": n * med("response/length") / gen if gen else None,
            "logprob_gap_max": med("engine/logprob_gap_max"), "startup_s": startup}


TRL_RUNS = ("trl-hf", "trl-vllm", "trl-vllm-reload")


def reload_sync(generation) -> None:
    """TRL's colocated weight push with vLLM's in-place ``reload_weights`` in place of its per-tensor
    ``load_weights``: the one change ``trl-vllm-reload`` makes to TRL. The tensors are TRL's own (its merged LoRA
    weights under its names, consumed as it yields them, before it unmerges)."""
    from lit_route.policy.engines.vllm_engine import reload_notices

    with reload_notices():
        generation.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": generation._iter_named_params(), "is_checkpoint_format": True})
    generation.llm.reset_prefix_cache()


def check_reload_sync(trainer) -> str:
    """After training, TRL's push once more (the last update's weights), then the engine's weights read back
    through its own kernels against the policy's merged ones: "ok", or the weights the engine did not take."""
    import functools

    from lit_route.policy.engines.readback import engine_readback, expected_readback, readback_mismatches
    from lit_route.policy.engines.vllm_engine import engine_layout
    from lit_route.policy.engines.weights import (
        changed_weight_names,
        conv1d_names,
        merged_weights,
        sync_shortfall,
    )

    generation = trainer.vllm_generation
    generation.sync_weights()
    llm, model = generation.llm, trainer.model
    fused, engine_params = llm.apply_model(engine_layout)[0]
    weights = merged_weights(model, fused)
    expected = expected_readback(weights, fused, engine_params, conv1d_names(model), 0)
    read = llm.apply_model(functools.partial(engine_readback, {n: w for n, (w, _) in expected.items()}, 0))[0]
    short = sync_shortfall([n for n, _ in weights], changed_weight_names(model), fused, engine_params,
                           readback_mismatches(expected, read))
    return "ok" if not short else f"not taken: {', '.join(short[:5])}"


def trl_run(spec: dict) -> dict:
    """TRL's RLOOTrainer at the same shape, tokens, LoRA and precision: ``trl-hf`` (its HF ``generate``),
    ``trl-vllm`` (``use_vllm=True, vllm_mode='colocate'``, as shipped) or ``trl-vllm-reload`` (the same with the
    weight push of :func:`reload_sync`). A run that fails is recorded with its error."""
    import rloo_vs_trl

    args = argparse.Namespace(pm_ckpt=spec["pm_ckpt"], prompts=spec["prompts"], k=spec["k"],
                              completion=spec["completion"], steps=spec["steps"])
    from lit_route.models.backbone import BackboneSpec, load_backbone, load_tokenizer
    from lit_route.policy.engines.hf_folder import engine_model_dir

    overrides = {}
    if spec["run"] != "trl-hf":
        overrides = {"use_vllm": True, "vllm_mode": "colocate"}
        # TRL hands the model's folder to vLLM, which cannot read the GGUF one: the same weights as a HF folder
        folder = BackboneSpec(model_path=str(engine_model_dir(rloo_vs_trl.SMOL)))
        rloo_vs_trl.load_backbone = lambda spec, causal_lm=False: load_backbone(folder, causal_lm=causal_lm)
        rloo_vs_trl.load_tokenizer = lambda spec: load_tokenizer(folder)
    if spec["run"] == "trl-vllm-reload":
        from lit_route.integrations.trl import quiet_trl_vllm_notice

        quiet_trl_vllm_notice()
        from trl.generation.vllm_generation import VLLMGeneration

        VLLMGeneration.sync_weights = reload_sync
    if not spec["pm_ckpt"]:  # the same stand-in reward as our runs: an untrained PM on the tiny built-in model
        from lit_route.policy.pm_scoring import load_reward_pm

        rloo_vs_trl.load_reward_pm = lambda ckpt: load_reward_pm(None, BackboneSpec())
    try:
        check = check_reload_sync if spec["run"] == "trl-vllm-reload" else None
        out = rloo_vs_trl.run_trl(args, rloo_vs_trl.bench_prompts(spec["prompts"] * spec["steps"]), check,
                                  **overrides)
    except Exception as err:  # recorded, not fatal: TRL may refuse this vLLM build
        return {**spec, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    return {**spec, "step_s": out["median_step_s"], "steps_s": out["steps_s"], "step_tokens": out["step_tokens"],
            "mean_completion_tokens": out["mean_completion_tokens"],
            **({"sync_check": out["after_train"]} if out["after_train"] is not None else {})}


def run_child(spec: dict) -> dict:
    from lit_route.policy.engines.vllm_engine import cpu_environment

    env = {**os.environ, **cpu_environment(2), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).parent.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": (proc.stderr or proc.stdout)[-600:]}
    return json.loads(lines[-1][len("RESULT "):])


def table(results: list[dict]) -> str:
    rows = ["| prompts×K×tokens | run | generation s | ×lean | step s | ×lean | sync s | tok/s | mean len | "
            "max gap | start s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in results:
        groups.setdefault((r["prompts"], r["k"], r["completion"]), {}).setdefault(r["run"], []).append(r)
    fmt = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    for (b, k, t), runs in groups.items():
        def med(run, key, runs=runs):
            values = [r[key] for r in runs.get(run, []) if r.get(key) is not None]
            return statistics.median(values) if values else None

        for run in runs:
            if all("error" in r for r in runs[run]):
                rows.append(f"| {b}×{k}×{t} | {run} | error: {runs[run][0]['error'][:80]!r} |||||||||")
                continue
            gen, step = med(run, "generation_s"), med(run, "step_s")
            g0, s0 = med("lean", "generation_s"), med("lean", "step_s")
            rows.append(f"| {b}×{k}×{t} | {run} | {fmt(gen)} | {fmt(gen / g0 if gen and g0 else None)} | "
                        f"{fmt(step)} | {fmt(step / s0 if step and s0 else None)} | {fmt(med(run, 'sync_s'), 3)} | "
                        f"{fmt(med(run, 'tokens_per_s'), 1)} | {fmt(med(run, 'mean_completion_tokens'), 1)} | "
                        f"{fmt(med(run, 'logprob_gap_max'), 5)} | {fmt(med(run, 'startup_s'), 1)} |")
    return "\n".join(rows)


def peers(results: list[dict]) -> str:
    """Our fastest step against each TRL run of the same shape: the ratio of step times, and of step time per
    generated token (TRL's samples need not be as long as ours), each step's tokens counted."""
    rows = ["| prompts×K×tokens | ours (fastest) | step s | TRL run | step s | ours / TRL | tokens per step, ours / "
            "TRL | s per token, ours / TRL |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["prompts"], r["k"], r["completion"]), []).append(r)

    def median_of(runs, key):
        values = [x[key] for x in runs if x.get(key) is not None]
        return statistics.median(values) if values else None

    def per_step_tokens(runs):  # the measured steps' tokens (the first step of a run is warm-up)
        return statistics.median(t for x in runs for t in (x.get("step_tokens") or [])[1:]) if runs else None

    for (b, k, t), runs in groups.items():
        by_run: dict[str, list[dict]] = {}
        for r in runs:
            if "error" not in r:
                by_run.setdefault(r["run"], []).append(r)
        ours = {run: median_of(rs, "step_s") for run, rs in by_run.items() if run not in TRL_RUNS}
        if not ours:
            continue
        best = min(ours, key=ours.get)
        for peer in TRL_RUNS:
            if peer not in by_run:
                if any(r["run"] == peer for r in runs):
                    err = next(r["error"] for r in runs if r["run"] == peer)
                    rows.append(f"| {b}×{k}×{t} | {best} | {ours[best]:.2f} | {peer} | error: {err[:60]!r} ||||")
                continue
            step = median_of(by_run[peer], "step_s")
            tok_ours, tok_peer = per_step_tokens(by_run[best]), per_step_tokens(by_run[peer])
            per_token = (ours[best] / tok_ours) / (step / tok_peer) if tok_ours and tok_peer else None
            rows.append(f"| {b}×{k}×{t} | {best} | {ours[best]:.2f} | {peer} | {step:.2f} | {ours[best] / step:.2f} | "
                        f"{tok_ours:.0f} / {tok_peer:.0f} | " + ("–" if per_token is None else f"{per_token:.2f}") + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pm_ckpt", default=None, help="finalised PreferenceModule checkpoint (the real reward)")
    parser.add_argument("--shapes", nargs="+", default=["2x4", "8x4"], help="prompts x K per step")
    parser.add_argument("--completions", nargs="+", type=int, default=[40, 128], help="max new tokens")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trl", action="store_true",
                        help="also run TRL's RLOOTrainer: HF generate, colocated vLLM, colocated vLLM with reload sync")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(trl_run(spec) if spec["run"] in TRL_RUNS else child(spec)), flush=True)
        return
    results = []
    runs = args.runs + (list(TRL_RUNS) if args.trl else [])
    for shape in args.shapes:
        b, k = (int(x) for x in shape.split("x"))
        for t in args.completions:
            for repeat in range(args.repeats):
                for run in runs:  # interleaved: a drift in the machine's load hits every run alike
                    spec = {"run": run, "prompts": b, "k": k, "completion": t, "steps": args.steps,
                            "pm_ckpt": args.pm_ckpt, "repeat": repeat}
                    results.append(run_child(spec))
                    print(json.dumps(results[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rloo_engines.json").write_text(json.dumps(results, indent=1))
    md = table(results) + ("\n\nAgainst TRL's RLOOTrainer:\n\n" + peers(results) if args.trl else "")
    (out / "rloo_engines.md").write_text(f"# RLOO engines\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
