"""Grouping a trainer's flat batch by prompt, OpenRLHF's request shapes, and groups formed across requests."""

import threading

import pytest

from lit_route.integrations.collector import GroupCollector, Scored
from lit_route.integrations.groups import completion_text, contiguous_groups, keyed_groups, scatter
from lit_route.integrations.openrlhf import RequestError, Sample, chat_messages, parse_request, split_query


def test_contiguous_groups_follow_trl_repeat_order():
    # TRL's RepeatSampler: each prompt num_generations times in a row; "a" drawn twice in a row is two groups
    prompts = ["a", "a", "b", "b", "a", "a", "a", "a"]
    assert contiguous_groups(prompts, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert contiguous_groups(prompts) == [[0, 1], [2, 3], [4, 5, 6, 7]]
    assert contiguous_groups(["a", "b", "c"], 4) == [[0], [1], [2]]  # one completion per prompt (evaluation)
    chats = [[{"role": "user", "content": "hi"}]] * 3 + [[{"role": "user", "content": "yo"}]] * 3
    assert contiguous_groups(chats, 3) == [[0, 1, 2], [3, 4, 5]]


def test_split_group_is_one_clear_error():
    with pytest.raises(ValueError, match=r"num_generations: samples 2\.\.4 share a prompt but are 3, not a multiple of 2"):
        contiguous_groups(["a", "a", "b", "b", "b"], 2)
    # a group of 2 split across processes leaves one completion here: it is not an evaluation batch, where every
    # prompt has one completion (that one stays allowed, see test_contiguous_groups_follow_trl_repeat_order)
    with pytest.raises(ValueError, match=r"^num_generations: sample 2 is the only completion of its prompt: .*"
                                         r"per_device_train_batch_size"):
        contiguous_groups(["p0", "p0", "p1"], 2)
    assert contiguous_groups(["p0", "p0", "p1"]) == [[0, 1], [2]]  # without a group size: runs as they are


def test_keyed_groups_and_scatter():
    prompts = ["x", "y", "x", "y", "x"]
    groups = keyed_groups(prompts, group_size=2)
    assert groups == [[0, 2], [4], [1, 3]]
    assert scatter(groups, [[1.0, -1.0], [0.0], [0.5, -0.5]], 5) == [1.0, 0.5, -1.0, -0.5, 0.0]
    with pytest.raises(ValueError, match="belong to no group"):
        scatter([[0]], [[1.0]], 2)


def test_completion_text_of_conversational_completions():
    assert completion_text([{"role": "assistant", "content": "4"}]) == "4"
    assert completion_text("plain") == "plain"


def test_split_query_finds_the_response():
    assert split_query("<s>Q: 2+2?\nA: 4</s>", "<s>Q: 2+2?\nA:", ("</s>",)) == (" 4", True)
    # the decoded query lost the prompt's BOS: the prompt is not a prefix, its text is found inside
    assert split_query("Q: 2+2? 4<|im_end|>\n", "<s>Q: 2+2?", ("<|im_end|>",)) == (" 4", False)
    assert split_query("BOS Q? yes<|im_end|>\n<pad><pad>", "Q?", ("<|im_end|>", "<pad>")) == (" yes", True)
    assert split_query("Q? keep trailing  ", "Q?") == (" keep trailing  ", True)
    # a response that repeats the prompt is the response, whole: the prompt's first occurrence ends it
    assert split_query("<s>Q? Q? is the question", "Q?") == (" Q? is the question", True)


def test_chat_templated_prompts_are_read_as_their_messages():
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n<|im_start|>assistant\n"
    assert chat_messages(chatml) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}]
    llama3 = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert chat_messages(llama3) == [{"role": "user", "content": "What is 2+2?"}]
    for not_chat in ["What is 2+2?", "<|im_start|>user\nHi<|im_end|>\n",  # no open assistant turn
                     "Preamble <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]:  # text outside the turns
        assert chat_messages(not_chat) is None
    samples, _ = parse_request({"query": [chatml + "Ok."], "prompts": [chatml]})
    assert samples[0].response == "Ok." and samples[0].context[-1]["content"] == "Hi\nthere"
    assert parse_request({"query": [chatml + "Ok."], "prompts": [chatml]}, unwrap_chat=False)[0][0].context == chatml


def test_parse_request_shapes_and_errors():
    body = {"query": ["p1 r1", "p1 r2"], "prompts": ["p1", "p1"], "labels": ["l", "l"]}
    samples, missing = parse_request(body)
    assert samples == [Sample("p1", " r1", "l"), Sample("p1", " r2", "l")] and missing == 0
    assert parse_request({"query": ["p r"], "prompts": ["p"]})[0] == [Sample("p", " r")]  # labels optional
    for bad, message in [({"prompts": []}, "query: expected a list of strings"),
                         # "\ud800" in JSON: a lone surrogate, which no tokenizer encodes
                         ({"query": ["p ok", "p \ud800"], "prompts": ["p", "p"]}, r"query\[1\]: not valid Unicode"),
                         ({"query": ["p ok"], "prompts": ["\udfff"]}, r"prompts\[0\]: not valid Unicode"),
                         ({"query": ["a"], "prompts": ["a", "b"]}, "prompts: 2 prompts for 1 queries"),
                         ({"query": ["a"], "prompts": [3]}, "prompts: expected a list of strings"),
                         ([1], "body: expected a JSON object")]:
        with pytest.raises(RequestError, match=message):
            parse_request(bad)


def _fake_score(calls):
    def score(groups):
        calls.append([len(g) for g in groups])
        return [[Scored(float(i), float(i), 0) for i, _ in enumerate(g)] for g in groups]
    return score


def test_collector_forms_groups_across_concurrent_single_sample_requests():
    calls: list = []
    collector = GroupCollector(_fake_score(calls), group_size=3, wait_s=30.0)
    out: dict = {}

    def one(prompt, k):
        out[prompt, k] = collector.rewards([Sample(prompt, f"r{k}")])[0].reward

    threads = [threading.Thread(target=one, args=(p, k)) for k in range(3) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(calls) == [[3], [3]]  # each prompt scored once, as a whole group
    assert sorted(out[("a", k)] for k in range(3)) == [0.0, 1.0, 2.0]
    assert collector.counts == {"groups": 2, "short_groups": 0, "singletons": 0}


def test_collector_scores_a_short_group_after_the_wait_and_a_lone_sample_as_zero():
    calls: list = []
    collector = GroupCollector(_fake_score(calls), group_size=4, wait_s=0.05)
    assert [s.reward for s in collector.rewards([Sample("a", "1"), Sample("a", "2")])] == [0.0, 1.0]
    assert [s.reward for s in collector.rewards([Sample("b", "1")])] == [0.0]
    assert calls == [[2]] and collector.counts == {"groups": 2, "short_groups": 2, "singletons": 1}


def test_collector_closes_a_group_at_the_size_its_request_names():
    """An evaluation round with fewer samples per prompt than training (OpenRLHF's --eval.n_samples_per_prompt)
    names its size: its groups close when complete, not after the wait for a training-sized group."""
    calls: list = []
    collector = GroupCollector(_fake_score(calls), group_size=8, wait_s=600.0)
    out: dict = {}
    threads = [threading.Thread(target=lambda k=k: out.setdefault(k, collector.rewards([Sample("e", f"r{k}")],
                                                                                     group_size=2)))
               for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert calls == [[2]] and collector.counts == {"groups": 1, "short_groups": 0, "singletons": 0}
    assert sorted(r[0].reward for r in out.values()) == [0.0, 1.0]


def test_collector_refuses_a_negative_wait():
    with pytest.raises(ValueError, match=r"^group_wait_s: expected a number >= 0; got -5$"):
        GroupCollector(_fake_score([]), group_size=2, wait_s=-5)


def test_collector_passes_a_scoring_error_to_every_waiting_request():
    def broken(groups):
        raise RuntimeError("PM out of memory")

    collector = GroupCollector(broken, group_size=None)
    with pytest.raises(RuntimeError, match="PM out of memory"):
        collector.rewards([Sample("a", "1"), Sample("a", "2")])
