"""The RLOO module with and without the routing callback, on tiny random models."""

import json

import lightning as L
import pytest
import torch

from lit_route.callbacks import UncertaintyRouting
from lit_route.judges import HFLocalJudge, ReplayJudge
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import GenerationConfig, completion_mask


def build(tmp_path, callbacks=(), max_steps=2, ckpt=None):
    L.seed_everything(0)
    module = RLOOPolicyModule(
        policy=BackboneSpec(), lora=LoraSpec(r=4, alpha=8), pm_backbone=BackboneSpec(),
        generation=GenerationConfig(num_samples=3, max_new_tokens=6), lr=1e-2,
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about the number {i}." for i in range(8)))
    dm = PromptDataModule(prompts=str(prompts), batch_size=2)
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=list(callbacks), default_root_dir=tmp_path,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
    )
    trainer.fit(module, dm, ckpt_path=ckpt)
    return module, trainer


def lora_state(module):
    return {k: v.clone() for k, v in module.policy.named_parameters() if v.requires_grad}


def test_judge_fraction_zero_reproduces_pm_only_run(tmp_path):
    plain, _ = build(tmp_path)
    judge = HFLocalJudge(model_path="builtin:tiny-llama", gguf_file=None, max_prompt_tokens=256)
    routed, _ = build(tmp_path, [UncertaintyRouting(judge, fraction=0.0)])
    a, b = lora_state(plain), lora_state(routed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert routed.last_step["judge/fraction"] == 0.0


def test_routing_changes_scores_and_counts(tmp_path):
    judge = HFLocalJudge(model_path="builtin:tiny-llama", gguf_file=None, max_prompt_tokens=256, tie_margin=-1.0)
    cb = UncertaintyRouting(judge, fraction=0.5, max_calls_total=100)
    module, _ = build(tmp_path, [cb])
    # 2 prompts x 3 pairs per step, half routed; tie_margin -1 never calls a tie -> every verdict is ±c
    assert module.last_step["judge/fraction"] == 0.5 and cb.pairs_routed == 6 and cb.pairs_seen == 12
    assert abs(module.last_step["reward/mean"]) < 1e-6  # antisymmetric S: group rewards sum to zero


def test_every_judge_call_failing_leaves_pm_scores_and_no_nan(tmp_path):
    verdicts = tmp_path / "none.jsonl"
    verdicts.write_text(json.dumps({"judge": "J", "prompt": "p", "response_a": "a", "response_b": "b", "winner": "A"}))
    cb = UncertaintyRouting(ReplayJudge(str(verdicts), judge="J"), fraction=1.0)  # nothing matches: all fail
    module, _ = build(tmp_path, [cb])
    step = module.last_step
    assert cb.failures["no_record"] == 12 and step["judge/failures"] == 6
    assert step["judge/fraction"] == 0.0
    assert all(torch.isfinite(torch.tensor(v)) for v in step.values())
    plain, _ = build(tmp_path)
    a, b = lora_state(plain), lora_state(module)
    assert all(torch.equal(a[k], b[k]) for k in a)  # failures change nothing: the PM scores stand


def test_callback_state_survives_checkpoint_and_resume(tmp_path):
    judge = HFLocalJudge(model_path="builtin:tiny-llama", gguf_file=None, max_prompt_tokens=256)
    cb = UncertaintyRouting(judge, fraction=0.5, max_calls_total=9)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    build(tmp_path, [cb, ckpt_cb], max_steps=2)
    assert cb.ledger.calls == 6
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1]
    state = torch.load(saved, weights_only=False)
    assert not any("embed_tokens" in k for k in state["state_dict"])  # adapters only
    resumed = UncertaintyRouting(judge, fraction=0.5, max_calls_total=9)
    build(tmp_path, [resumed], max_steps=4, ckpt=str(saved))
    # restored 6 calls; the cap of 9 leaves 3 for the next step, then none
    assert resumed.ledger.calls == 9 and resumed.pairs_routed == 9


def test_completion_mask_stops_after_first_eos():
    comps = torch.tensor([[5, 6, 9, 7, 0], [9, 1, 2, 3, 4], [1, 2, 3, 4, 5]])
    assert completion_mask(comps, eos_ids=[9], pad_id=0).tolist() == [
        [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_logprobs_are_those_of_the_distribution_that_was_sampled():
    from lit_route.models.backbone import load_backbone
    from lit_route.policy.sampling import sample, token_logprobs

    torch.manual_seed(0)
    model = load_backbone(BackboneSpec(model_path="builtin:tiny-llama"), causal_lm=True).eval()
    prompt = torch.randint(3, 200, (2, 5))
    mask = torch.ones_like(prompt)
    config = GenerationConfig(num_samples=2, max_new_tokens=6, temperature=0.5, engine="hf")
    torch.manual_seed(1)
    out = model.generate(input_ids=prompt.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0),
                         do_sample=True, temperature=0.5, top_p=1.0, top_k=0, max_new_tokens=6, eos_token_id=[],
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    comps = out.sequences[:, prompt.shape[1]:]
    # the scores generate sampled from: logits / T
    sampled = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1).gather(-1, comps.unsqueeze(-1))[..., 0]
    cmask = torch.ones_like(comps, dtype=torch.float)
    with torch.no_grad():
        ours = token_logprobs(model, prompt.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), comps, cmask,
                              temperature=0.5)
    # float32: cached incremental decoding and one full forward sum attention in different orders
    assert torch.allclose(ours, sampled, atol=1e-4)
    torch.manual_seed(1)
    again, _ = sample(model, prompt, mask, config, eos_ids=[], pad_id=0)
    assert torch.equal(again, comps)  # sample() draws from the same distribution: no silent top-k


@pytest.mark.parametrize("kwargs,match", [
    (dict(updates_per_batch=2, accumulate_batches=2), "updates_per_batch"),
    (dict(beta=-0.1), "beta"),
    (dict(kl_estimator="k2"), "kl_estimator"),
    (dict(generation=GenerationConfig(num_samples=1)), "generation.num_samples"),
    (dict(generation=GenerationConfig(temperature=0.0)), "generation.temperature"),
    (dict(policy=None), "policy"),
])
def test_bad_rloo_options_fail_at_construction_naming_the_option(kwargs, match):
    base = dict(policy=BackboneSpec(), pm_backbone=BackboneSpec())
    with pytest.raises(ValueError, match=f"^{match}"):
        RLOOPolicyModule(**{**base, **kwargs})


def test_loading_a_policy_checkpoint_reports_no_frozen_weight_missing(tmp_path, recwarn):
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    module, _ = build(tmp_path, [ckpt_cb], max_steps=1)
    (saved,) = (tmp_path / "ckpt").glob("*.ckpt")
    recwarn.clear()
    loaded = RLOOPolicyModule.load_from_checkpoint(saved, weights_only=False)
    assert not [w for w in recwarn if "not in the checkpoint" in str(w.message) or "missing" in str(w.message).lower()]
    a, b = lora_state(module), lora_state(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8)])
def test_lean_decoding_samples_the_warped_distribution(top_k, top_p):
    """The lean loop's cached logits equal a whole forward's, and its draws follow the warped distribution."""
    from lit_route.models.backbone import load_backbone
    from lit_route.policy.decode import lean_generate, warp
    from lit_route.policy.sampling import sequence_inputs

    torch.manual_seed(0)
    model = load_backbone(BackboneSpec(model_path="builtin:tiny-llama"), causal_lm=True).eval()
    prompt = torch.randint(3, 200, (3, 6))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # a left-padded row
    comps = lean_generate(model, prompt, mask, 8, 0.7, top_k, top_p, eos_ids=[], pad_id=0)
    assert comps.shape == (3, 8)
    with torch.no_grad():
        logits = model(**sequence_inputs(prompt, mask, comps, torch.ones_like(comps, dtype=torch.float))).logits
    warped = warp(logits[:, prompt.shape[1] - 1 : -1].reshape(-1, logits.shape[-1]), 0.7, top_k, top_p)
    drawn = warped.gather(-1, comps.reshape(-1, 1))
    assert torch.isfinite(drawn).all()  # every drawn token survives top-k / top-p of a whole forward's logits
    if top_k:
        assert ((warped > -torch.inf).sum(-1) == top_k).all()


def test_lean_decoding_stops_rows_at_eos_and_pads_after():
    from lit_route.models.backbone import load_backbone
    from lit_route.policy.decode import lean_generate

    torch.manual_seed(0)
    model = load_backbone(BackboneSpec(model_path="builtin:tiny-llama"), causal_lm=True).eval()
    prompt = torch.randint(3, 200, (4, 5))
    eos = list(range(3, 130))  # about half the vocabulary ends a row: rows end early, at different steps
    comps = lean_generate(model, prompt, torch.ones_like(prompt), 12, 1.0, 0, 1.0, eos_ids=eos, pad_id=0)
    for row in comps.tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        if ends:
            assert all(t == 0 for t in row[ends[0] + 1 :])


def test_split_forward_gives_the_whole_forward_numbers(tmp_path):
    """With LoRA on the top layer only, the frozen bottom runs once per batch: same log-probs, same update."""

    def run(split):
        L.seed_everything(0)
        module = RLOOPolicyModule(
            policy=BackboneSpec(), lora=LoraSpec(r=4, alpha=8, top_layers=1), pm_backbone=BackboneSpec(),
            generation=GenerationConfig(num_samples=3, max_new_tokens=6), lr=1e-2, split_forward=split)
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(f"Tell me about the number {i}." for i in range(8)))
        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
        trainer.fit(module, PromptDataModule(prompts=str(prompts), batch_size=2))
        return module

    whole, split = run(False), run(True)
    assert whole._trunk() is None and split._trunk() is not None and split._trunk().start == 1
    # float32: the top layers see the same inputs; sums run in other orders when the sequence is cut in two
    a, b = lora_state(whole), lora_state(split)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert split.last_step["kl/mean"] == pytest.approx(whole.last_step["kl/mean"], abs=1e-5)


@pytest.mark.parametrize("split", [False, True])
def test_a_batch_trained_at_once_takes_its_sampling_logprobs_from_the_update_pass(split, tmp_path):
    """Without a reward pipeline the batch is trained on by the policy that sampled it: the top layers run twice
    per batch (the reference and the update), not three times, and the KL, advantages, loss and gradients are
    those of a separate sampling-policy pass."""
    L.seed_everything(0)
    module = RLOOPolicyModule(
        policy=BackboneSpec(), lora=LoraSpec(r=4, alpha=8, top_layers=1), pm_backbone=BackboneSpec(),
        generation=GenerationConfig(num_samples=3, max_new_tokens=6), lr=1e-2, split_forward=split)
    for name, p in module.policy.named_parameters():  # adapters that move the policy away from the reference
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about the number {i}." for i in range(4)))
    dm = PromptDataModule(prompts=str(prompts), batch_size=2)
    dm.connect(module)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    top = [m for m in module.policy.modules() if type(m).__name__.endswith("DecoderLayer")][-1]
    lengths = []  # sequence length of each pass through the top layer (generation's are shorter)
    top.register_forward_hook(lambda _m, args, _out: lengths.append(args[0].shape[1]))
    whole = lambda rollout: rollout.prompt_ids.shape[1] + rollout.completions.shape[1]  # noqa: E731

    def step(rollout):
        module.policy.zero_grad()
        loss = module.update_loss(rollout, 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    fused = module.rollout(batch, 0)
    fused_loss, fused_grads = step(fused)
    # the reference pass and the update's (before: a third, for the sampling policy)
    assert lengths.count(whole(fused)) == 2
    separate = module.finish_rollout(module.start_rollout(batch, 0))  # the pipelined path keeps its own pass
    separate_loss, separate_grads = step(separate)
    assert lengths.count(whole(fused)) == 5
    assert torch.equal(fused.completions, separate.completions)
    assert float(fused.kl.abs().max()) > 1e-4  # the adapters are on: KL is something to compare
    # float32: the update's pass runs with autograd on and the separate one without, the same kernels on the
    # same inputs; the tolerance only allows for the kernels' reduction orders
    assert torch.allclose(fused.old_logp, separate.old_logp, atol=1e-5)
    assert torch.allclose(fused.kl, separate.kl, atol=1e-5)
    assert torch.allclose(fused.advantages, separate.advantages, atol=1e-5)
    assert torch.allclose(fused_loss, separate_loss, atol=1e-5)
    assert all(torch.allclose(fused_grads[n], separate_grads[n], atol=1e-5) for n in fused_grads)


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, alpha=8, top_layers=1)])
def test_group_scoring_from_the_shared_prefix_equals_whole_sequences(lora, tiny_model_dir):
    from lit_route.data.encoding import PairEncoder
    from lit_route.policy.pm_scoring import score_groups
    from lit_route.preference import PreferenceModule, SNGPConfig

    torch.manual_seed(0)
    pm = PreferenceModule(backbone=BackboneSpec(model_path=str(tiny_model_dir)), lora=lora,
                          sngp=SNGPConfig(num_features=64)).eval()
    pm.head.finalize()
    if lora is not None:  # adapters that do something
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
    encoder = PairEncoder(pm.tokenizer, max_length=256)
    prompts = ["Name a colour.", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]]
    completions = [["Red.", "Blue, like the sky.", "I like green", "Red."], ["Hello!", "Hi there.", "Hey", "Yo, hi"]]
    whole = score_groups(pm, encoder, prompts, completions, batch_size=4, share_prefix=False)
    shared = score_groups(pm, encoder, prompts, completions, batch_size=4, share_prefix=True)
    # float32: attention over a cached prefix sums in another order than over the whole sequence
    assert torch.allclose(whole[0], shared[0], atol=1e-4) and torch.allclose(whole[1], shared[1], atol=1e-4)
    assert torch.equal(shared[0], -shared[0].transpose(1, 2))
