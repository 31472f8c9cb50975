"""Rollout engines without vLLM: the gap and importance weights (by hand), packing, the lean engine, and the
``server`` engine's retries against a loopback server (tests/test_engines_vllm.py runs them on a real vLLM)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from loopback import Loopback, Reply

from lit_route.models.backbone import BackboneSpec, LoraSpec, apply_lora, load_backbone
from lit_route.policy.engines import build_engine
from lit_route.policy.engines.base import pack
from lit_route.policy.engines.correction import logprob_gap, truncated_is_weights
from lit_route.policy.engines.server import ServerEngine, ServerError
from lit_route.policy.engines.weights import engine_lora_rank, merged_weights
from lit_route.policy.sampling import EngineOptions, GenerationConfig


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
                         Reply(raw_body=_completion(2, [70, 71, 1]))]
        options = EngineOptions(base_url=f"{server.url}/v1", served_model="base", adapter_dir=str(tmp_path),
                                max_attempts=4)
        engine = ServerEngine(options)
        engine._policy.backoff_base_s = 0.01
        policy = _policy()
        engine.sync(policy, 0)
        out = engine.generate(policy, torch.tensor([[65, 66]]), torch.tensor([[1, 1]]),
                              GenerationConfig(num_samples=2, max_new_tokens=3), [1], 0, 7)
    assert engine.stats == {"requests": 4, "retries": 2}
    assert out.completions.tolist() == [[70, 71, 1]] * 2 and out.logprobs[0].tolist() == [-0.5] * 3
    load, completion = server.requests[0], server.requests[-1]
    assert load["path"] == "/v1/load_lora_adapter" and (tmp_path / "v0" / "adapter_config.json").exists()
    assert completion["body"]["model"] == load["body"]["lora_name"] and completion["body"]["prompt"] == [65, 66]
    assert completion["body"]["n"] == 2 and completion["body"]["seed"] is not None


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
