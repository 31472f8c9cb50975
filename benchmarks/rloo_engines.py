"""Rollout engines on the RLOO step: ``lean``, ``hf`` and colocated ``vllm`` (merged-weight and adapter sync).

For each shape (prompts × K) and completion limit, every engine runs ``--steps`` RLOO steps of SmolLM2-135M-
Instruct with LoRA r=8 on q/k/v/o of the top 4 layers (the settings of ``rloo_vs_trl.py``: temperature 0.9,
top-p 0.95, lr 5e-5, β 0.05), each run in its own process (vLLM holds one engine per process, and so no run
inherits another's threads or caches). Runs are interleaved (lean, hf, vllm-merged, vllm-adapter, lean, ...)
``--repeats`` times; the first step of a run is warm-up; medians over the rest. Reported per run: the generation
stage (engine sync included: what the trainer waits for), the whole step, the sync alone, completion tokens per
second of generation, the mean completion length, the engine–trainer log-prob gap, and the engine's start-up.
With ``--trl``, TRL's RLOOTrainer with its own colocated vLLM path is tried beside them (recorded as an error
when TRL refuses this vLLM build).

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
    return {**spec, "step_s": statistics.median(times), "generation_s": gen, "sync_s": med("time/engine_sync"),
            "mean_completion_tokens": med("response/length"),
            "tokens_per_s": n * med("response/length") / gen if gen else None,
            "logprob_gap_max": med("engine/logprob_gap_max"), "startup_s": startup}


def trl_vllm(spec: dict) -> dict:
    """TRL's RLOOTrainer with ``use_vllm=True, vllm_mode='colocate'`` (its own vLLM path), if it runs here."""
    import rloo_vs_trl

    args = argparse.Namespace(pm_ckpt=spec["pm_ckpt"], prompts=spec["prompts"], k=spec["k"],
                              completion=spec["completion"], steps=spec["steps"])
    from trl import RLOOConfig

    original = RLOOConfig.__init__

    def with_vllm(self, *a, **kw):
        original(self, *a, **{**kw, "use_vllm": True, "vllm_mode": "colocate"})

    RLOOConfig.__init__ = with_vllm
    from lit_route.models.backbone import BackboneSpec, load_backbone, load_tokenizer
    from lit_route.policy.engines.hf_folder import engine_model_dir

    # TRL hands the model's folder to vLLM, which cannot read the GGUF one: the same weights as a HF folder
    folder = BackboneSpec(model_path=str(engine_model_dir(rloo_vs_trl.SMOL)))
    rloo_vs_trl.load_backbone = lambda spec, causal_lm=False: load_backbone(folder, causal_lm=causal_lm)
    rloo_vs_trl.load_tokenizer = lambda spec: load_tokenizer(folder)
    if not spec["pm_ckpt"]:  # the same stand-in reward as our runs: an untrained PM on the tiny built-in model
        from lit_route.policy.pm_scoring import load_reward_pm

        rloo_vs_trl.load_reward_pm = lambda ckpt: load_reward_pm(None, BackboneSpec())
    try:
        out = rloo_vs_trl.run_trl(args, rloo_vs_trl.bench_prompts(spec["prompts"] * spec["steps"]))
        return {**spec, "step_s": out["median_step_s"], "mean_completion_tokens": out["mean_completion_tokens"]}
    except Exception as err:  # recorded, not fatal: TRL may refuse this vLLM build
        return {**spec, "error": f"{type(err).__name__}: {str(err)[:300]}"}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pm_ckpt", default=None, help="finalised PreferenceModule checkpoint (the real reward)")
    parser.add_argument("--shapes", nargs="+", default=["2x4", "8x4"], help="prompts x K per step")
    parser.add_argument("--completions", nargs="+", type=int, default=[40, 128], help="max new tokens")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trl", action="store_true", help="also try TRL's RLOOTrainer with its colocated vLLM")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(trl_vllm(spec) if spec["run"] == "trl-vllm" else child(spec)), flush=True)
        return
    results = []
    runs = args.runs + (["trl-vllm"] if args.trl else [])
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
    md = table(results)
    (out / "rloo_engines.md").write_text(f"# RLOO engines\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
