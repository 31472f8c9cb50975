import pytest

from lit_route.data.encoding import PLAIN_TEMPLATE, PairEncoder, pad_batch, water_fill
from lit_route.models.pooling import last_token_index


def test_water_fill_shortens_the_longest_first():
    assert water_fill([10, 3, 4], 17) == [10, 3, 4]
    assert water_fill([10, 3, 4], 13) == [6, 3, 4]
    assert water_fill([10, 9, 1], 11) == [5, 5, 1]
    assert sum(water_fill([100, 50, 7], 60)) == 60


def test_plain_template_layout(byte_tokenizer):
    enc = PairEncoder(byte_tokenizer, max_length=1000, template="plain")
    ids = enc.encode("Q?", "first", "second").input_ids
    text = byte_tokenizer.decode(ids)
    assert text == f"{PLAIN_TEMPLATE[0]}Q?{PLAIN_TEMPLATE[1]}first{PLAIN_TEMPLATE[2]}second{PLAIN_TEMPLATE[3]}"


def test_chat_template_marks_the_two_responses(byte_tokenizer):
    enc = PairEncoder(byte_tokenizer, max_length=1000)
    assert enc.use_chat
    text = byte_tokenizer.decode(enc.encode([{"role": "user", "content": "hi"}], "A!", "B!").input_ids)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>response_a\nA!<|im_end|>\n<|im_start|>response_b\nB!<|im_end|>"


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_truncation_keeps_second_response_and_final_token(byte_tokenizer, template):
    enc = PairEncoder(byte_tokenizer, max_length=120, template=template)
    full = PairEncoder(byte_tokenizer, max_length=10_000, template=template)
    long_first = "x" * 500
    out = enc.encode("prompt", long_first, "short answer")
    ref = full.encode("prompt", long_first, "short answer")
    assert out.truncated and len(out.input_ids) == 120
    assert out.input_ids[-5:] == ref.input_ids[-5:]  # the pooled token and the template tail survive
    text = byte_tokenizer.decode(out.input_ids)
    assert "short answer" in text and "prompt" in text  # only the long first response was cut
    assert enc.n_truncated == 1


def test_context_loses_its_oldest_tokens(byte_tokenizer):
    enc = PairEncoder(byte_tokenizer, max_length=110, template="plain")
    text = byte_tokenizer.decode(enc.encode("OLD" + "y" * 300 + "NEW", "a", "b").input_ids)
    assert "NEW" in text and "OLD" not in text


def test_pad_and_last_token():
    batch = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert last_token_index(batch["attention_mask"]).tolist() == [2, 0]
    left = batch["attention_mask"].flip(1)
    assert last_token_index(left).tolist() == [2, 2]


def test_pointwise_encoding(byte_tokenizer):
    enc = PairEncoder(byte_tokenizer, max_length=1000, mode="pointwise")
    first, second = enc.encode_orders([{"role": "user", "content": "hi"}], "good", "bad")
    assert byte_tokenizer.decode(first.input_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\ngood<|im_end|>"
    assert byte_tokenizer.decode(second.input_ids).endswith("assistant\nbad<|im_end|>")
    plain = PairEncoder(byte_tokenizer, max_length=1000, template="plain", mode="pointwise")
    assert byte_tokenizer.decode(plain.encode("Q?", "ok").input_ids) == "Prompt:\nQ?\n\nResponse:\nok\n\nIs this response good?"
    with pytest.raises(ValueError, match="takes 1 response"):
        plain.encode("Q?", "a", "b")
