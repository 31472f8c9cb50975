"""The ``constraints`` task: deterministic generator, disjoint held-out split, verifiers on hand-made cases."""

import json

import pytest

from lit_route.data.io import iter_records, resolve_path
from lit_route.tasks.build import label_pairs
from lit_route.tasks.constraints import (
    FAMILIES,
    SHIFT_FAMILIES,
    Constraint,
    generate_prompts,
    generate_shift_prompts,
    parse_prompt,
    split_subjects,
)
from lit_route.tasks.verify import judge_pair, passes


def bundled(split):
    return [r for _, r in iter_records(resolve_path(f"bundled:constraints/prompts-{split}.jsonl"))]


def test_generator_is_a_function_of_the_seed():
    assert generate_prompts(0) == generate_prompts(0)
    assert generate_prompts(0)["train"] != generate_prompts(1)["train"]


def test_bundled_prompts_are_what_the_committed_script_writes():
    # the shipped files must be reproducible: `python -m lit_route.tasks.build prompts --seed 0`
    expected = generate_prompts(0)
    assert bundled("train") == expected["train"] and bundled("heldout") == expected["heldout"]
    assert bundled("shift") == generate_shift_prompts(0)


def test_shift_prompts_share_neither_family_nor_topic_with_training():
    train, shift = bundled("train"), bundled("shift")
    assert {r["family"] for r in shift} == set(SHIFT_FAMILIES) and not set(SHIFT_FAMILIES) & set(FAMILIES)
    assert {r["subject"] for r in shift} <= set(split_subjects(0)["heldout"]["topics"])
    assert not {r["subject"] for r in shift} & {r["subject"] for r in train}
    assert len({r["prompt"] for r in shift}) == len(shift) == 40


def test_heldout_split_is_disjoint_from_train():
    train, heldout = bundled("train"), bundled("heldout")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert not {r["subject"] for r in train} & {r["subject"] for r in heldout}  # no topic or addend pair shared
    assert {r["family"] for r in heldout} == set(FAMILIES) == {r["family"] for r in train}
    assert len({r["id"] for r in train + heldout}) == len(train) + len(heldout)
    subjects = split_subjects(0)
    assert not set(subjects["train"]["topics"]) & set(subjects["heldout"]["topics"])


def test_every_bundled_prompt_parses_back_to_its_record():
    for r in bundled("train") + bundled("heldout") + bundled("shift"):
        c = parse_prompt(r["prompt"])
        assert (c.family, c.subject, c.param) == (r["family"], r["subject"], r["param"])
        assert c.prompt() == r["prompt"]


@pytest.mark.parametrize("prompt, response, expected", [
    # max_words: 1..n words; punctuation is not a word, inner apostrophes and hyphens are part of one
    ("Describe cats in at most 4 words.", "Soft, curious, independent hunters.", True),
    ("Describe cats in at most 4 words.", "Cats are soft and curious.", False),
    ("Describe cats in at most 4 words.", "Cat's well-known purr!", True),
    ("Describe cats in at most 4 words.", "  ...  ", False),
    ("Describe the night sky in at most 10 words.", "one two three four five six seven eight nine ten", True),
    # min_words: n words or more, counted as max_words counts them
    ("Describe cats in at least 4 words.", "Cats are soft, curious.", True),
    ("Describe cats in at least 4 words.", "Cat's well-known purr!", False),
    ("Describe cats in at least 4 words.", "", False),
    # start_word: the first word, any case, quotes and punctuation around it ignored
    ('Write one sentence about rain. Start your answer with the word "Today".', "Today, rain fell.", True),
    ('Write one sentence about rain. Start your answer with the word "Today".', '"today it rained"', True),
    ('Write one sentence about rain. Start your answer with the word "Today".', "Rain fell today.", False),
    ('Write one sentence about rain. Start your answer with the word "Today".', "Todays rain.", False),
    # include_word: a whole word, any case, not a substring
    ('Write one sentence about apples that uses the word "gold".', "Gold apples shine.", True),
    ('Write one sentence about apples that uses the word "gold".', "Golden apples shine.", False),
    ('Write one sentence about apples that uses the word "gold".', "Apples, gold-leafed.", False),
    # add: the last number of the answer is the sum
    ("What is 3 + 4?", "3 + 4 = 7", True),
    ("What is 3 + 4?", "The answer is 7.", True),
    ("What is 3 + 4?", "7 is the sum of 3 and 4", False),
    ("What is 3 + 4?", "seven", False),
    ("What is 9 + 9?", "18", True),
])
def test_verifier_on_hand_cases(prompt, response, expected):
    assert passes(prompt, response) is expected


def test_judge_pair_prefers_the_passing_response_and_ties_otherwise():
    p = "What is 2 + 2?"
    assert judge_pair(p, "4", "5") == "A"
    assert judge_pair(p, "5", "2 + 2 = 4") == "B"
    assert judge_pair(p, "4", "four is 4") == "tie"
    assert judge_pair(p, "3", "5") == "tie"


def test_prompts_of_another_task_are_rejected():
    with pytest.raises(ValueError, match="not a prompt of the constraints task"):
        parse_prompt("Describe cats in a few words.")
    with pytest.raises(ValueError, match="family"):
        Constraint("rhyme", "cats", 1).prompt()


def test_label_pairs_pairs_each_passing_sample_with_each_failing_one():
    records = [{"id": "t-1", "prompt": "What is 1 + 2?", "family": "add"},
               {"id": "t-2", "prompt": "Describe owls in at most 4 words.", "family": "max_words"}]
    samples = [["3", "1 + 2 = 3", "4", ""],
               ["Wise night hunters.", "Wise night hunters.", "Owls are birds of the night.", "Owls hoot at night."]]
    pairs, rates = label_pairs(records, samples)
    assert rates == {"add": 0.5, "max_words": 0.75}
    got = {(p["subset"], p["chosen"], p["rejected"]) for p in pairs}
    # the empty sample and the duplicate passing sample give no pair
    assert got == {("add", "3", "4"), ("add", "1 + 2 = 3", "4"),
                   ("max_words", "Wise night hunters.", "Owls are birds of the night."),
                   ("max_words", "Owls hoot at night.", "Owls are birds of the night.")}
    assert len({p["id"] for p in pairs}) == len(pairs)
    assert all(json.loads(json.dumps(p)) == p for p in pairs)


def test_bundled_pairs_are_labelled_by_the_verifier():
    for split in ("train", "heldout", "shift"):
        pairs = [r for _, r in iter_records(resolve_path(f"bundled:constraints/pairs-{split}.jsonl.gz"))]
        assert pairs and all(passes(p["prompt"], p["chosen"]) and not passes(p["prompt"], p["rejected"]) for p in pairs)
        assert {p["subset"] for p in pairs} == set(SHIFT_FAMILIES if split == "shift" else FAMILIES)
        prompts = {r["prompt"] for r in bundled(split)}
        assert all(p["prompt"] in prompts for p in pairs)  # held-out pairs come from held-out prompts only


def test_pairs_without_a_family_are_the_full_file_filtered(tmp_path):
    full = [r for _, r in iter_records(resolve_path("bundled:constraints/pairs-train.jsonl.gz"))]
    shipped = [r for _, r in iter_records(resolve_path("bundled:constraints/pairs-train-without-add.jsonl.gz"))]
    assert shipped == [r for r in full if r["subset"] != "add"]
    from lit_route.tasks.build import main

    out = tmp_path / "c"
    out.mkdir()
    (out / "pairs-train.jsonl.gz").write_bytes(resolve_path("bundled:constraints/pairs-train.jsonl.gz").read_bytes())
    main(["drop", "--families", "add", "--out", str(out)])
    written = resolve_path(str(out / "pairs-train-without-add.jsonl.gz")).read_bytes()
    assert written == resolve_path("bundled:constraints/pairs-train-without-add.jsonl.gz").read_bytes()
