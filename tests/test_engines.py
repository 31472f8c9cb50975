"""Rollout engines without vLLM: the gap and importance weights (by hand), packing, the lean engine, and the
``server`` engine's retries against a loopback server (tests/test_engines_vllm.py runs them on a real vLLM)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from loopback import Loopback, Reply

from lit_route.models.backbone import BackboneSpec, LoraSpec, apply_lora, load_backbone
from lit_route.policy.decode import warp
from lit_route.policy.engines import build_engine
from lit_route.policy.engines.base import EngineOutput, pack, sample_seeds
from lit_route.policy.engines.correction import logprob_gap, truncated_is_weights
from lit_route.policy.engines.readback import COLUMNS, expected_readback, readback_mismatches, sample_columns
from lit_route.policy.engines.server import ServerEngine, ServerError
from lit_route.policy.engines.weights import conv1d_names, engine_lora_rank, merged_weights, sync_shortfall
from lit_route.policy.sampling import (
    EngineOptions,
    GenerationConfig,
    completion_logprobs,
    nucleus_logprobs,
    nucleus_mass,
    sample,
    sequence_inputs,
)


def test_gap_and_truncated_weights_by_hand():
    engine = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    mean, top = logprob_gap(engine, trainer, mask)
    assert mean == pytest.approx((0.5 + 0 + 2 + 0) / 4) and top == pytest.approx(2.0)  # masked 9s ignored
    w = truncated_is_weights(trainer, engine, mask, cap=3.0)
    # exp(-0.5), exp(0), exp(2) = 7.39 truncated to 3, exp(0); 0 off the mask
    assert torch.allclose(w, torch.tensor([[math.exp(-0.5), 1.0, 3.0], [1.0, 0.0, 0.0]]))


def test_pack_pads_after_eos_and_masks_logprobs():
    out = pack([[5, 2], [7, 8, 9]], [[-0.1, -0.2], [-1.0, -1.0, -1.0]], eos_ids=[2], pad_id=0)
    assert out.completions.tolist() == [[5, 2, 0], [7, 8, 9]]
    assert out.mask.tolist() == [[1, 1, 0], [1, 1, 1]]  # the EOS counts, the padding does not
    assert out.logprobs[0].tolist() == pytest.approx([-0.1, -0.2, 0.0])


def test_vllm_lora_ranks_round_up():
    assert [engine_lora_rank(r) for r in (1, 4, 8, 9, 200)] == [1, 8, 8, 16, 256]
    with pytest.raises(ValueError, match=r"lora\.r"):
        engine_lora_rank(1024)


def test_merged_weights_are_the_adapted_forward():
    policy = apply_lora(load_backbone(BackboneSpec(), causal_lm=True), LoraSpec(r=4, alpha=8, target_modules=["q_proj"]))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    weights = dict(merged_weights(policy))
    assert weights and all(k.endswith("q_proj.weight") and k.startswith("model.layers.") for k in weights)
    layer = policy.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    assert torch.allclose(x @ weights["model.layers.0.self_attn.q_proj.weight"].T, layer(x), atol=1e-5)


def test_merged_weights_bring_the_fused_siblings_of_an_adapted_layer():
    policy = apply_lora(load_backbone(BackboneSpec(), causal_lm=True),
                        LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    weights = dict(merged_weights(policy, fused))
    layers = len(policy.get_base_model().model.layers)
    # an engine loads qkv_proj whole: k_proj (not adapted) comes along, unchanged; the MLP is not touched
    assert sorted(weights) == sorted(f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(layers)
                                     for m in "qkv")
    k_proj = policy.get_base_model().model.layers[0].self_attn.k_proj
    assert torch.equal(weights["model.layers.0.self_attn.k_proj.weight"], k_proj.weight)
    assert sorted(dict(merged_weights(policy))) == sorted(n for n in weights if "k_proj" not in n)


def test_sync_shortfall_names_what_an_engine_did_not_take():
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    layer = "model.layers.3.self_attn"
    pushed = [f"{layer}.{m}_proj.weight" for m in "qkvo"]
    changed = {f"{layer}.q_proj.weight", f"{layer}.o_proj.weight"}
    params = {f"{layer}.qkv_proj.weight", f"{layer}.o_proj.weight", "model.norm.weight"}
    # a complete push the engine holds (model.norm, which it leaves alone, is no shortfall)
    assert sync_shortfall(pushed, changed, fused, params, set()) == []
    # a changed weight left out of the push: by our own account, whatever the engine says
    assert sync_shortfall(pushed[:3], changed, fused, params, set()) == [f"{layer}.o_proj.weight"]
    # a pushed weight the engine does not hold: by its read-back
    qkv = f"{layer}.qkv_proj.weight"
    assert sync_shortfall(pushed, changed, fused, params, {qkv}) == [qkv]
    assert sync_shortfall(pushed[::2], changed, fused, params, set()) == [f"{layer}.o_proj.weight",
                                                                          f"{qkv} (part: k_proj missing)"]


def test_readback_compares_exact_columns_of_fused_and_transposed_weights():
    torch.manual_seed(0)
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    attn = "model.layers.0.self_attn"
    qkv, o, norm, conv = f"{attn}.qkv_proj.weight", f"{attn}.o_proj.weight", "model.norm.weight", "h.0.c_proj.weight"
    weights = [(f"{attn}.{m}_proj.weight", torch.randn(rows, 6))
               for m, rows in zip("qkvo", (4, 2, 2, 4), strict=True)]
    weights += [(norm, torch.randn(6)), (conv, torch.randn(6, 6))]  # GPT-2's Conv1D stores (in, out)
    pushed = dict(weights)
    expected = expected_readback(weights, fused, {qkv, o, norm, conv}, {conv}, seed=3)
    assert {n: width for n, (width, _) in expected.items()} == {qkv: 6, o: 6, norm: None, conv: 6}
    cols = sample_columns(6, 3)
    assert len(set(cols)) == COLUMNS and len({tuple(sample_columns(576, seed)) for seed in range(3)}) == 3
    # what an engine holding the push reads back: q, k, v stacked in qkv_proj; o_proj with a padded extra row
    engine = {qkv: torch.cat([pushed[f"{attn}.{m}_proj.weight"] for m in "qkv"])[:, cols],
              o: torch.cat([pushed[o], torch.zeros(1, 6)])[:, cols], norm: pushed[norm],
              conv: pushed[conv].T[:, cols]}
    assert readback_mismatches(expected, engine) == set()
    # a bfloat16 engine holds the pushed float32 weights rounded to bfloat16
    assert readback_mismatches(expected, {n: t.to(torch.bfloat16) for n, t in engine.items()}) == set()
    # weights the engine kept from before: a step of 1e-3 is far above float32 rounding (1e-7 relative)
    stale = engine | {o: engine[o] + 1e-3, norm: engine[norm] + 1e-3}
    assert readback_mismatches(expected, stale) == {o, norm}
    assert readback_mismatches(expected, engine | {conv: pushed[conv][:, cols]}) == {conv}  # (in, out) as (out, in)
    # a fused layer pushed in part is not read back (sync_shortfall names it)
    assert qkv not in expected_readback(weights[1:], fused, {qkv, o, norm}, set(), seed=3)


def test_conv1d_names_are_gpt2_layers_under_their_checkpoint_names():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=16))
    names = {f"transformer.h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert conv1d_names(gpt2) == names
    assert conv1d_names(apply_lora(gpt2, LoraSpec(r=2, alpha=4, target_modules=["c_attn"]))) == names  # peft's too
    assert conv1d_names(load_backbone(BackboneSpec(), causal_lm=True)) == set()


def test_nucleus_logprobs_are_the_truncated_distribution():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0, -3.0]] * 3])  # (1, T + 1 = 3, V = 5)
    completions, mask = torch.tensor([[0, 1]]), torch.ones(1, 2)
    temperature = 0.9
    p = torch.softmax(logits[0, 0] / temperature, -1)  # 0.656, 0.216, 0.071, 0.023, 0.005
    config = GenerationConfig(temperature=temperature, top_p=0.9)
    nucleus = p[:3].sum()  # the smallest top set reaching 0.9
    expected = torch.log(p[[0, 1]] / nucleus)
    assert torch.allclose(nucleus_logprobs(logits, completions, mask, config)[0], expected, atol=1e-6)
    top2 = torch.log(p[[0, 1]] / p[:2].sum())
    assert torch.allclose(nucleus_logprobs(logits, completions, mask, GenerationConfig(temperature=temperature,
                                                                                       top_k=2))[0], top2, atol=1e-6)
    # nothing truncated: the untruncated log-probs; a token outside the nucleus stays finite
    untruncated = completion_logprobs(logits, completions, mask, temperature)
    assert torch.equal(nucleus_logprobs(logits, completions, mask, GenerationConfig(temperature=temperature)),
                       untruncated)
    edge = nucleus_logprobs(logits, torch.tensor([[3, 0]]), torch.tensor([[1.0, 0.0]]), config)
    assert torch.isfinite(edge).all() and edge[0, 1] == 0


@pytest.mark.parametrize("first", [1, 16, 1000])
def test_nucleus_mass_from_the_largest_logits_is_the_whole_sort(first):
    """The nucleus found among the ``first`` largest logits (rows whose nucleus is larger sorted whole) is the
    one a float64 sort of the whole vocabulary finds."""
    torch.manual_seed(0)
    v = 1000
    sharpness = torch.logspace(-1, 1, 64).unsqueeze(-1)  # from nearly flat rows (nuclei of hundreds) to peaked ones
    logits = torch.randn(64, v) * sharpness
    top_p = 0.9
    ranked = torch.sort(logits.double(), descending=True, dim=-1).values
    probs = torch.softmax(ranked, -1)
    before = probs.cumsum(-1) - probs
    # float32 logits place the running probability to ~1e-7: no token of this seed's rows is within 1e-6 of
    # top_p, so rounding cannot move an edge
    assert (before - top_p).abs().min() > 1e-6
    sizes = (before < top_p).sum(-1)
    assert (sizes > 16).any() and (sizes <= 16).any()  # both paths are taken at first=16
    expected = torch.logsumexp(ranked.masked_fill(before >= top_p, -torch.inf), dim=-1)
    assert torch.allclose(nucleus_mass(logits, top_p, first).double(), expected, atol=1e-5)


class InStepEngine:
    """An engine exactly in step with the trainer: it samples with the training model (the lean loop) and
    reports the log-probs of the truncated distribution it sampled from, computed its own way (a softmax over
    the warped logits of a whole forward)."""

    name = "in-step"

    def sync(self, model, version):
        pass

    def close(self):
        pass

    @torch.no_grad()
    def generate(self, model, prompt_ids, prompt_mask, config, eos_ids, pad_id, seed) -> EngineOutput:
        comps, mask = sample(model, prompt_ids, prompt_mask, config, eos_ids, pad_id, seed)
        k = config.num_samples
        inputs = sequence_inputs(prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0), comps, mask)
        logits = model(**inputs, use_cache=False).logits[:, prompt_ids.shape[1] - 1 : -1]
        n, t, v = logits.shape
        warped = warp(logits.reshape(n * t, v), config.temperature, config.top_k, config.top_p).view(n, t, v)
        logp = torch.log_softmax(warped, -1).gather(-1, comps.unsqueeze(-1)).squeeze(-1)
        return EngineOutput(comps, mask, torch.where(mask.bool(), logp, 0.0))


def test_an_engine_in_step_shows_no_gap_and_unit_weights_at_top_p(tmp_path):
    """At top-p 0.95 the gap of an engine in step is rounding, not the nucleus' mass (−ln 0.95 = 0.05)."""
    import lightning as L

    from lit_route.policy.data import PromptDataModule
    from lit_route.policy.module import RLOOPolicyModule

    L.seed_everything(0)
    options = EngineOptions(importance_sampling=True)
    module = RLOOPolicyModule(policy=BackboneSpec(), lora=LoraSpec(r=4, alpha=8), pm_backbone=BackboneSpec(), lr=1e-2,
                              generation=GenerationConfig(num_samples=3, max_new_tokens=6, temperature=0.9,
                                                          top_p=0.95, top_k=50, engine_options=options))
    module.engine = InStepEngine()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about the number {i}." for i in range(4)))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, PromptDataModule(prompts=str(prompts), batch_size=2))
    step = module.last_step
    # float32, one model: the two sides differ by summation orders only (a whole forward against the
    # trainer's split one); 1e-4 is far above that and far below the nucleus' 5e-2
    assert step["engine/logprob_gap_max"] < 1e-4, step
    assert abs(step["engine/is_weight_mean"] - 1) < 1e-4, step


def test_lean_engine_is_the_sampling_loop():
    engine = build_engine(GenerationConfig(), BackboneSpec(), None)
    model = load_backbone(BackboneSpec(), causal_lm=True).eval()
    ids, mask = torch.tensor([[0, 65, 66], [65, 66, 67]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    engine.sync(model, 0)
    out = engine.generate(model, ids, mask, GenerationConfig(num_samples=2, max_new_tokens=4), [1], 0, 0)
    assert out.completions.shape[0] == 4 and out.logprobs is None


def _completion(n: int, tokens: list[int]) -> bytes:
    choice = lambda i: {"index": i, "text": "", "token_ids": tokens, "finish_reason": "length",  # noqa: E731
                        "logprobs": {"token_logprobs": [-0.5] * len(tokens), "tokens": [], "top_logprobs": []}}
    return json.dumps({"id": "c", "object": "text_completion", "choices": [choice(i) for i in range(n)]}).encode()


def _policy():
    return apply_lora(load_backbone(BackboneSpec(), causal_lm=True), LoraSpec(r=4, alpha=8))


def test_server_engine_retries_transport_failures(tmp_path):
    with Loopback() as server:
        server.script = [Reply(raw_body=b"Success"),  # load_lora_adapter v0
                         Reply(status=503), Reply(status=429, headers={"retry-after": "0.01"}),
                         Reply(raw_body=_completion(1, [70, 71, 1])), Reply(raw_body=_completion(1, [70, 71, 1]))]
        options = EngineOptions(base_url=f"{server.url}/v1", served_model="base", adapter_dir=str(tmp_path),
                                max_attempts=4)
        engine = ServerEngine(options)
        engine._policy.backoff_base_s = 0.01
        policy = _policy()
        engine.sync(policy, 0)
        out = engine.generate(policy, torch.tensor([[65, 66]]), torch.tensor([[1, 1]]),
                              GenerationConfig(num_samples=2, max_new_tokens=3), [1], 0, 7)
    # one request per sample: two of them, one 503 and one 429 among their attempts
    assert engine.stats == {"requests": 5, "retries": 2}
    assert out.completions.tolist() == [[70, 71, 1]] * 2 and out.logprobs[0].tolist() == [-0.5] * 3
    load, completions = server.requests[0], server.requests[1:]
    assert load["path"] == "/v1/load_lora_adapter" and (tmp_path / "v0" / "adapter_config.json").exists()
    for completion in completions:
        assert completion["body"]["model"] == load["body"]["lora_name"] and completion["body"]["prompt"] == [65, 66]
        assert completion["body"]["n"] == 1
    assert {c["body"]["seed"] for c in completions} == set(sample_seeds(7, 1, 2))


def _seeded_server(body: dict) -> Reply:
    """Answers like vLLM's seeding: choice j of an ``n``-sample request is drawn with seed ``seed + j``, and the
    same prompt and seed always draw the same tokens."""
    def draw(seed):
        rng = random.Random(f"{body['prompt']}/{seed}")
        return [rng.randrange(2, 1000) for _ in range(3)]

    choices = [{"index": j, "text": "", "token_ids": draw(body["seed"] + j), "finish_reason": "length",
                "logprobs": {"token_logprobs": [-0.5] * 3, "tokens": [], "top_logprobs": []}}
               for j in range(body["n"])]
    return Reply(raw_body=json.dumps({"id": "c", "object": "text_completion", "choices": choices}).encode())


def test_server_engine_gives_every_sample_its_own_stream(tmp_path):
    with Loopback(answer=_seeded_server) as server:
        server.script = [Reply(raw_body=b"Success")]  # load_lora_adapter v0
        engine = ServerEngine(EngineOptions(base_url=f"{server.url}/v1", served_model="base",
                                            adapter_dir=str(tmp_path)))
        policy = _policy()
        engine.sync(policy, 0)
        prompts, mask = torch.tensor([[65, 66], [65, 66], [67, 68]]), torch.ones(3, 2, dtype=torch.long)
        config = GenerationConfig(num_samples=4, max_new_tokens=3)
        first = engine.generate(policy, prompts, mask, config, [1], 0, 7).completions.tolist()
        again = engine.generate(policy, prompts, mask, config, [1], 0, 7).completions.tolist()
        other = engine.generate(policy, prompts, mask, config, [1], 0, 8).completions.tolist()
    groups = [{tuple(c) for c in first[i * 4 : (i + 1) * 4]} for i in range(3)]
    assert all(len(g) == 4 for g in groups)
    assert not groups[0] & groups[1]  # the duplicated prompt's two groups share no sample
    assert again == first and other != first  # a seed gives the same samples again, another seed others


def test_a_model_in_the_place_of_a_freed_one_is_synced_anew(tmp_path, monkeypatch):
    """A model freed and the next one allocated where it was share an ``id()``: the next one, at the same
    version, is still loaded, under a name of its own."""
    from lit_route.policy.engines import server as server_module

    monkeypatch.setattr(server_module, "id", lambda obj: 1, raising=False)  # every model at one address
    with Loopback() as server:
        server.script = [Reply(raw_body=b"Success"), Reply(raw_body=b"Success")]  # two load_lora_adapter calls
        engine = ServerEngine(EngineOptions(base_url=f"{server.url}/v1", served_model="base",
                                            adapter_dir=str(tmp_path)))
        first, second = _policy(), _policy()
        engine.sync(first, 0)
        engine.sync(first, 0)  # in step already: nothing to send
        engine.sync(second, 0)
    names = [r["body"]["lora_name"] for r in server.requests if r["path"] == "/v1/load_lora_adapter"]
    assert len(names) == 2 and names[0] != names[1] and engine._current == names[1]


def test_sample_seeds_are_one_per_sample_and_reproducible():
    seeds = sample_seeds(7, 3, 4)
    assert len(set(seeds)) == 12 and seeds == sample_seeds(7, 3, 4) and seeds != sample_seeds(8, 3, 4)
    assert all(0 <= s < 2**31 - 1 for s in seeds)
    # vLLM seeds an n-sample request's samples seed + j: no sample's stream is another's shifted by a few
    assert not {s + j for s in seeds for j in range(1, 8)} & set(seeds)
    assert sample_seeds(None, 2, 3) == [None] * 6


def test_server_engine_refusal_is_one_clear_error(tmp_path):
    with Loopback() as server:
        server.script = [Reply(status=404, raw_body=b'{"error": "adapter folder not found"}')]
        engine = ServerEngine(EngineOptions(base_url=f"{server.url}/v1", served_model="base",
                                            adapter_dir=str(tmp_path)))
        with pytest.raises(ServerError, match=r"load_lora_adapter: HTTP 404.*adapter folder not found"):
            engine.sync(_policy(), 0)
    assert len(server.requests) == 1  # a 4xx is not retried


def test_generation_config_of_an_older_checkpoint_gets_engine_defaults():
    import pickle

    old = GenerationConfig(num_samples=3)
    del old.__dict__["engine_options"]  # what a checkpoint from before engine options holds
    restored = pickle.loads(pickle.dumps(old))
    assert restored.num_samples == 3 and restored.engine_options == EngineOptions()


@pytest.mark.parametrize(("generation", "message"), [
    ({"engine": "vllm2"}, r"generation\.engine: expected one of lean, hf, vllm, server"),
    ({"engine": "server"}, r"generation\.engine_options\.base_url"),
    ({"engine": "vllm", "engine_options": EngineOptions(sync="lora")}, r"engine_options\.sync"),
    ({"engine": "vllm", "engine_options": EngineOptions(importance_sampling_cap=0.5)}, r"importance_sampling_cap"),
])
def test_bad_engine_options_are_one_line(generation, message):
    from lit_route.policy.module import RLOOPolicyModule

    with pytest.raises(ValueError, match=message):
        RLOOPolicyModule(policy=BackboneSpec(), pm_backbone=BackboneSpec(), generation=GenerationConfig(**generation))


def test_engine_folder_is_converted_once_and_plain_folders_pass_through(tmp_path, tiny_model_dir):
    from lit_route.policy.engines.hf_folder import engine_model_dir

    folder = engine_model_dir(BackboneSpec(), cache=tmp_path)
    assert (folder / "config.json").exists() and list(folder.glob("*.safetensors"))
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert engine_model_dir(BackboneSpec(), cache=tmp_path) == folder  # cached: not written again
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if ".partial" in p.name]
    assert engine_model_dir(BackboneSpec(model_path=str(tiny_model_dir)), cache=tmp_path) == tiny_model_dir
    with pytest.raises(ValueError, match="quantization"):
        engine_model_dir(BackboneSpec(model_path=str(tiny_model_dir), quantization="4bit"), cache=tmp_path)
