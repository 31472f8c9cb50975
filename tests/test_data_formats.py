"""TRL preference and prompt-only formats, files read through `datasets`, lone surrogates, cached mapping."""

import gzip
import json

import pytest

from lit_route.data import DataFormatError, ReadReport, load_pairs
from lit_route.data.readers import detect_format, load_pair_dataset
from lit_route.policy.data import read_prompts

SYSTEM = {"role": "system", "content": "You are terse."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trl_explicit_conversational_is_not_rm_bench(tmp_path):
    row = {"prompt": [SYSTEM, user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
    assert detect_format(row) == "trl"
    (pair,) = load_pairs(write_jsonl(tmp_path / "explicit.jsonl", [row]))
    assert pair.prompt == (SYSTEM, user("2+2?"))
    assert (pair.chosen, pair.rejected, pair.id) == ("4", "5", "explicit:1")


def test_trl_implicit_conversational_takes_the_shared_turns_as_prompt(tmp_path):
    row = {"chosen": [user("hi"), assistant("hello"), user("2+2?"), assistant("4")],
           "rejected": [user("hi"), assistant("hello"), user("2+2?"), assistant("5")]}
    (pair,) = load_pairs(write_jsonl(tmp_path / "implicit.jsonl", [row]))
    assert pair.prompt == (user("hi"), assistant("hello"), user("2+2?"))
    assert (pair.chosen, pair.rejected) == ("4", "5")


def test_trl_implicit_text_splits_at_the_common_beginning(tmp_path):
    row = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    (pair,) = load_pairs(write_jsonl(tmp_path / "implicit_text.jsonl", [row]))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", " blue.", " green.")


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},
         r"trl.jsonl:2: field 'chosen': chosen and rejected must differ in their final message only"),
        ({"chosen": [assistant("x")], "rejected": [assistant("y")]}, r"trl.jsonl:2: field 'prompt': no prompt"),
        ({"prompt": [user("q")], "chosen": [user("x")], "rejected": [assistant("y")]},
         r"trl.jsonl:2: field 'chosen': the final message must be the assistant's"),
        ({"prompt": [user("q")], "chosen": [{"role": "assistant"}], "rejected": [assistant("y")]},
         r"trl.jsonl:2: field 'chosen': message 0 must have string 'role' and 'content'"),
    ],
)
def test_trl_errors_name_file_line_and_field(tmp_path, row, match):
    good = {"prompt": [user("q")], "chosen": [assistant("x")], "rejected": [assistant("y")]}
    with pytest.raises(DataFormatError, match=match):
        load_pairs(write_jsonl(tmp_path / "trl.jsonl", [good, row]), format="trl")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".jsonl.gz"])
def test_lone_surrogate_is_rejected_by_file_line_and_field(tmp_path, suffix):
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    bad = '{"prompt": "p", "chosen": "a", "rejected": "b\\ud800"}'
    text = f"[\n{good},\n{bad}\n]" if suffix == ".json" else f"{good}\n{bad}\n"
    path = tmp_path / f"pairs{suffix}"
    path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
    with pytest.raises(DataFormatError, match=rf"pairs{suffix}:\d: field 'rejected': lone UTF-16 surrogate"):
        load_pairs(path)
    report = ReadReport()
    assert len(load_pairs(path, skip_invalid=True, report=report)) == 1 and len(report.skipped) == 1


def test_lone_surrogate_in_messages_names_the_message(tmp_path):
    rows = [{"prompt": [user("ok")], "chosen": [assistant("x")], "rejected": [assistant("y")]}]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    path.write_text(path.read_text() + '{"prompt": [{"role": "user", "content": "\\udfff"}], "chosen": "x", '
                    '"rejected": "y"}\n')
    with pytest.raises(DataFormatError, match=r"conv.jsonl:2: field 'prompt\[0\].content': lone UTF-16"):
        load_pairs(path)


def test_lone_surrogate_in_prompts_and_replay_verdicts(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800"}\n')
    with pytest.raises(DataFormatError, match=r"prompts.jsonl:2: field 'prompt': lone UTF-16 surrogate"):
        read_prompts(str(prompts))
    text = tmp_path / "prompts.txt"
    text.write_text("fine\nbad \\ud800\n".replace("\\ud800", "\ud800"), encoding="utf-8", errors="surrogatepass")
    with pytest.raises(DataFormatError, match=r"prompts.txt:2: invalid UTF-8"):
        read_prompts(str(text))
    from lit_route.judges.replay import ReplayJudge

    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text('{"judge": "J", "prompt": "p", "response_a": "a", "response_b": "b", "winner": "A"}\n'
                        '{"judge": "J", "prompt": "p", "response_a": "a\\ud83d", "response_b": "b", "winner": "A"}\n')
    with pytest.raises(DataFormatError, match=r"verdicts.jsonl:2: field 'response_a': lone UTF-16 surrogate"):
        ReplayJudge(str(verdicts), judge="J")


def test_prompt_only_conversations_with_a_system_message_stay_distinct(tmp_path):
    rows = [{"prompt": [SYSTEM, user(f"question {i}")]} for i in range(3)]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    prompts = read_prompts(str(path), first_turn_only=True)
    assert prompts == [[SYSTEM, user(f"question {i}")] for i in range(3)]
    multi = write_jsonl(tmp_path / "multi.jsonl", [{"prompt": [SYSTEM, user("a"), assistant("b"), user("c")]}])
    assert read_prompts(str(multi), first_turn_only=True) == [[SYSTEM, user("a")]]
    assert read_prompts(str(multi)) == [[SYSTEM, user("a"), assistant("b"), user("c")]]


def test_parquet_and_saved_dataset_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": [user(f"q{i}")], "chosen": [assistant("yes")], "rejected": [assistant("no")]} for i in range(4)]
    ds = Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    parquet = load_pairs(tmp_path / "pairs.parquet")
    assert [p.prompt for p in parquet] == [(user(f"q{i}"),) for i in range(4)]
    assert [p.id for p in parquet] == [f"pairs:{i}" for i in range(4)]  # tables have rows, not lines
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [p.chosen for p in load_pairs(tmp_path / "saved")] == ["yes"] * 4
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_pairs(tmp_path / "dict")) == 4
    assert len(load_pairs(f"{tmp_path / 'dict'}#test")) == 1
    with pytest.raises(DataFormatError, match=r"no split 'dev'"):
        load_pairs(f"{tmp_path / 'dict'}#dev")
    bad = Dataset.from_list([*rows, {"prompt": [user("q")], "chosen": [assistant(" ")], "rejected": [assistant("n")]}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataFormatError, match=r"bad.parquet: row 4: field 'chosen': empty final assistant message"):
        load_pairs(tmp_path / "bad.parquet")


def test_mapping_is_cached_by_datasets(tmp_path):
    from datasets.fingerprint import Hasher

    from lit_route.data.datamodule import PairEncodeFn
    from lit_route.models.tiny import build_byte_tokenizer

    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(5)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    first = load_pair_dataset(path)
    again = load_pair_dataset(path)
    assert first.cache_files and first.cache_files == again.cache_files  # the second read maps nothing
    # the encoding map's fingerprint depends on what decides its output only, so it is found again next run
    fn = PairEncodeFn(build_byte_tokenizer(), 64, "auto", "pairwise")
    before = Hasher.hash(fn)
    fn({"prompt": ["p"], "prompt_messages": [None], "chosen": ["a"], "rejected": ["b"], "subset": [""],
        "id": ["x"], "strength": [None]})
    assert Hasher.hash(fn) == before == Hasher.hash(PairEncodeFn(build_byte_tokenizer(), 64, "auto", "pairwise"))
    assert Hasher.hash(PairEncodeFn(build_byte_tokenizer(), 65, "auto", "pairwise")) != before


def test_limit_reads_past_skipped_records(tmp_path):
    rows = [{"prompt": "p", "chosen": " ", "rejected": "b"}] * 2 + [
        {"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    path = write_jsonl(tmp_path / "some_bad.jsonl", rows)
    report = ReadReport()
    pairs = load_pairs(path, skip_invalid=True, limit=2, report=report)
    assert [p.prompt for p in pairs] == ["q0", "q1"] and len(report.skipped) == 2
