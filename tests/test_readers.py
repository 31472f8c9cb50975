import gzip
import json

import pytest
from conftest import shared_file

from lit_route.data import DataFormatError, ReadReport, load_pairs
from lit_route.data.readers import detect_format


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bundled_llmbar_and_hh_parse():
    pairs = load_pairs("bundled:llmbar/Natural.json")
    assert len(pairs) == 100 and pairs[0].subset == "Natural"
    report = ReadReport()
    hh = load_pairs("bundled:hh-rlhf/harmless-base-test.jsonl.gz", skip_invalid=True, report=report)
    assert len(hh) + len(report.skipped) == 2312
    assert len(report.skipped) == 9  # counted, never silent
    first = hh[0]
    assert isinstance(first.prompt, tuple) and first.prompt[0]["role"] == "user"
    assert first.prompt[-1]["role"] == "user"  # the differing Assistant turn is the response


def test_hh_without_opt_in_names_file_and_line():
    with pytest.raises(DataFormatError, match=r"harmless-base-test.jsonl.gz:87: field 'chosen': empty final"):
        load_pairs("bundled:hh-rlhf/harmless-base-test.jsonl.gz")


def test_llmbar_label_selects_chosen(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([
        {"input": "q", "output_1": "one", "output_2": "two", "label": 2},
        {"input": "q2", "output_1": "uno", "output_2": "dos", "label": 1},
    ], indent=1))
    pairs = load_pairs(path)
    assert (pairs[0].chosen, pairs[0].rejected) == ("two", "one")
    assert (pairs[1].chosen, pairs[1].rejected) == ("uno", "dos")


def test_llmbar_bad_label_names_line(tmp_path):
    path = tmp_path / "set.json"
    path.write_text('[\n {"input": "q", "output_1": "a", "output_2": "b", "label": 1},\n'
                    ' {"input": "q", "output_1": "a", "output_2": "b", "label": 3}\n]')
    with pytest.raises(DataFormatError, match=r"set.json:3: field 'label'"):
        load_pairs(path)


def test_rmbench_expands_nine_comparisons(tmp_path):
    row = {"id": "7", "subset": "chat", "prompt": "p", "chosen": ["c0", "c1", "c2"], "rejected": ["r0", "r1", "r2"]}
    pairs = load_pairs(write_jsonl(tmp_path / "rm.jsonl", [row]))
    assert len(pairs) == 9
    by_cell = {p.id: p for p in pairs}
    assert by_cell["7:01"].subset == "chat/hard"  # concise chosen vs detailed rejected
    assert by_cell["7:11"].subset == "chat/normal"
    assert by_cell["7:20"].subset == "chat/easy"
    assert (by_cell["7:01"].chosen, by_cell["7:01"].rejected) == ("c0", "r1")


def test_rmb_record(tmp_path):
    row = {"pair_uid": "u1", "conversation_input": [{"role": "user", "content": "hi", "language": "en"}],
           "chosen": {"llm_name": "a", "answer": "hello"}, "reject": {"llm_name": "b", "answer": "go away"},
           "category_path": "Pairwise_set/Helpfulness/Chat"}
    (pair,) = load_pairs(write_jsonl(tmp_path / "rmb.jsonl", [row]))
    assert pair.prompt == ({"role": "user", "content": "hi"},)
    assert (pair.chosen, pair.rejected, pair.id) == ("hello", "go away", "u1")


def test_generic_and_rewardbench(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "strength": 2}]
    (pair,) = load_pairs(write_jsonl(tmp_path / "g.jsonl", rows))
    assert pair.strength == 2.0
    rb = [{"id": 1, "subset": "s", "prompt": "p", "chosen": "a", "rejected": "b", "chosen_model": "m"}]
    assert detect_format(rb[0]) == "rewardbench"
    assert load_pairs(write_jsonl(tmp_path / "rb.jsonl", rb))[0].subset == "s"


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "p", "rejected": "b"}, r"bad.jsonl:2: field 'chosen': missing"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, r"bad.jsonl:2: field 'chosen': expected a string"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, r"bad.jsonl:2: field 'chosen': empty string"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "id": "x"}, r"bad.jsonl:2: field 'id': duplicate id 'x'"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path, row, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "id": "x"}, row])
    with pytest.raises(DataFormatError, match=match):
        load_pairs(path, format="generic")


def test_invalid_json_invalid_utf8_and_truncated_gzip(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataFormatError, match=r"broken.jsonl:2: invalid JSON"):
        load_pairs(path)
    report = ReadReport()
    assert len(load_pairs(path, skip_invalid=True, report=report)) == 1 and len(report.skipped) == 1
    utf = tmp_path / "utf.jsonl"
    utf.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"utf.jsonl:2: invalid UTF-8"):
        load_pairs(utf)
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 50)[:-20])
    with pytest.raises(DataFormatError, match=r"cut.jsonl.gz: cannot decompress"):
        load_pairs(gz)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataFormatError, match="no preference pairs"):
        load_pairs(path)


@pytest.mark.parametrize(
    ("parts", "fmt", "n"),
    [
        (("rewardbench", "chat-hard-llmbar.jsonl"), "rewardbench", 419),
        (("rm-bench", "chat_filtered.json"), "rmbench", 129 * 9),
        (("llmbar", "Adversarial-GPTOut.json"), "llmbar", 47),
    ],
)
def test_shared_samples_parse_with_auto_detection(parts, fmt, n):
    path = shared_file(*parts)
    assert len(load_pairs(path)) == n
    assert len(load_pairs(path, format=fmt)) == n


def test_shared_rmb_sample():
    path = shared_file("rmb", "pairwise.jsonl.gz")
    report = ReadReport()
    pairs = load_pairs(path, skip_invalid=True, report=report)
    assert len(pairs) + len(report.skipped) == 14543 and len(report.skipped) == 2


def test_huge_row_reads_and_truncates(tmp_path, byte_tokenizer):
    from lit_route.data.encoding import PairEncoder

    huge = "word " * 1_000_000  # a 5 MB response
    path = write_jsonl(tmp_path / "huge.jsonl", [{"prompt": "p", "chosen": huge, "rejected": "short"}])
    (pair,) = load_pairs(path)
    enc = PairEncoder(byte_tokenizer, max_length=256, template="plain")
    ab, ba = enc.encode_both(pair)
    assert len(ab.input_ids) == len(ba.input_ids) == 256 and ab.truncated
    assert "short" in byte_tokenizer.decode(ab.input_ids)
