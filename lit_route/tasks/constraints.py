"""The ``constraints`` task: short instructions whose every constraint a program can check.

Four families, each a prompt template whose parameters can be read back from the prompt text, so a verifier
needs nothing but ``(prompt, response)``:

- ``max_words``: ``Describe {topic} in at most {n} words.`` -- 1 to n words;
- ``start_word``: ``Write one sentence about {topic}. Start your answer with the word "{w}".`` -- first word w;
- ``include_word``: ``Write one sentence about {topic} that uses the word "{w}".`` -- w among the words;
- ``add``: ``What is {a} + {b}?`` -- the last number in the answer is a + b.

One more family is kept out of the training and held-out sets, for a distribution shift whose cue contradicts
one the PM learns from ``max_words`` (there the shorter response passes 97% of the time):

- ``min_words``: ``Describe {topic} in at least {n} words.`` -- n words or more.

Words are runs of letters and digits (inner apostrophes and hyphens kept); comparisons ignore case.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

TOPICS = (
    "the ocean", "winter", "cats", "coffee", "music", "the moon", "trains", "gardens", "rain", "books",
    "mountains", "bread", "dogs", "the desert", "bicycles", "autumn", "the city", "rivers", "birds", "tea",
    "forests", "snow", "the sun", "libraries", "horses", "islands", "clocks", "summer", "bridges", "apples",
    "the night sky", "boats", "chocolate", "wind", "cheese", "lakes", "stars", "pianos", "spring", "kites",
    "candles", "the beach", "owls", "volcanoes", "markets", "soup", "clouds", "museums", "bees", "maps",
    "the forest floor", "lighthouses", "thunderstorms", "gardening", "rainbows", "castles", "foxes", "honey",
    "airplanes", "school",
)
START_WORDS = ("Yes", "Today", "Honestly", "Sometimes", "Indeed", "Usually", "Clearly", "Often", "Here", "Every")
INCLUDE_WORDS = ("blue", "quiet", "gold", "small", "fast", "warm", "green", "happy", "old", "bright", "soft", "tiny")
MAX_WORDS = range(4, 11)
MIN_WORDS = range(8, 15)  # SmolLM2's answers within 20 new tokens run 1-20 words: about half reach these
ADDENDS = range(1, 10)
FAMILIES = ("max_words", "start_word", "include_word", "add")
SHIFT_FAMILIES = ("min_words",)

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’\-][A-Za-z0-9]+)*")
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Constraint:
    """One instruction: its family, the subject (a topic, or ``"a+b"`` for ``add``) and its parameter."""

    family: str
    subject: str
    param: str | int

    def prompt(self) -> str:
        """The prompt text the policy sees."""
        if self.family == "max_words":
            return f"Describe {self.subject} in at most {self.param} words."
        if self.family == "min_words":
            return f"Describe {self.subject} in at least {self.param} words."
        if self.family == "start_word":
            return f'Write one sentence about {self.subject}. Start your answer with the word "{self.param}".'
        if self.family == "include_word":
            return f'Write one sentence about {self.subject} that uses the word "{self.param}".'
        if self.family == "add":
            a, b = self.subject.split("+")
            return f"What is {a} + {b}?"
        raise ValueError(f"family: expected one of {FAMILIES + SHIFT_FAMILIES}, got {self.family!r}")

    def check(self, response: str) -> bool:
        """Whether ``response`` satisfies the constraint."""
        words = _WORD.findall(response)
        if self.family == "max_words":
            return 1 <= len(words) <= int(self.param)
        if self.family == "min_words":
            return len(words) >= int(self.param)
        if self.family == "start_word":
            return bool(words) and words[0].lower() == str(self.param).lower()
        if self.family == "include_word":
            return str(self.param).lower() in (w.lower() for w in words)
        if self.family == "add":
            numbers = _NUMBER.findall(response)
            a, b = (int(x) for x in self.subject.split("+"))
            return bool(numbers) and int(numbers[-1]) == a + b
        raise ValueError(f"family: expected one of {FAMILIES + SHIFT_FAMILIES}, got {self.family!r}")


_PATTERNS = (
    ("max_words", re.compile(r"Describe (?P<subject>.+) in at most (?P<param>\d+) words\.")),
    ("min_words", re.compile(r"Describe (?P<subject>.+) in at least (?P<param>\d+) words\.")),
    ("start_word", re.compile(r'Write one sentence about (?P<subject>.+)\. Start your answer with the word "(?P<param>[^"]+)"\.')),
    ("include_word", re.compile(r'Write one sentence about (?P<subject>.+) that uses the word "(?P<param>[^"]+)"\.')),
    ("add", re.compile(r"What is (?P<a>\d+) \+ (?P<b>\d+)\?")),
)


def parse_prompt(prompt: str) -> Constraint:
    """The constraint stated by a prompt of this task (surrounding whitespace ignored).

    Raises:
        ValueError: when the text is not a prompt of this task.
    """
    text = prompt.strip()
    for family, pattern in _PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        if family == "add":
            return Constraint("add", f"{match['a']}+{match['b']}", "sum")
        param = int(match["param"]) if family in ("max_words", "min_words") else match["param"]
        return Constraint(family, match["subject"], param)
    raise ValueError(f"not a prompt of the constraints task: {text[:80]!r}")


def split_subjects(seed: int, heldout_fraction: float = 0.2) -> dict[str, dict[str, list[str]]]:
    """Disjoint train / held-out subjects: topics for the word families, addend pairs for ``add``."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    sums = [f"{a}+{b}" for a in ADDENDS for b in ADDENDS]
    rng.shuffle(topics)
    rng.shuffle(sums)
    n_topics, n_sums = round(len(topics) * heldout_fraction), round(len(sums) * heldout_fraction)
    return {
        "heldout": {"topics": sorted(topics[:n_topics]), "sums": sorted(sums[:n_sums])},
        "train": {"topics": sorted(topics[n_topics:]), "sums": sorted(sums[n_sums:])},
    }


def _candidates(family: str, subjects: dict[str, list[str]]) -> list[Constraint]:
    if family == "add":
        return [Constraint("add", s, "sum") for s in subjects["sums"]]
    params = {"max_words": list(MAX_WORDS), "min_words": list(MIN_WORDS), "start_word": START_WORDS,
              "include_word": INCLUDE_WORDS}[family]
    return [Constraint(family, t, p) for t in subjects["topics"] for p in params]


def generate_prompts(seed: int = 0, per_family: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Prompt records ``{"id", "prompt", "family", "subject", "param"}`` for the ``train`` and ``heldout`` splits.

    The splits share no subject (topic or addend pair), hence no prompt. Records are drawn without replacement
    and are a function of ``seed`` only.

    Args:
        seed: Seed of the subject split and the draws.
        per_family: Prompts per family and split (default ``{"train": 120, "heldout": 20}``); capped by the
            number of distinct prompts a family has in the split.
    """
    per_family = per_family or {"train": 120, "heldout": 20}
    subjects = split_subjects(seed)
    out = {}
    for split in ("train", "heldout"):
        rng = random.Random(f"{seed}-{split}")
        records = []
        for family in FAMILIES:
            pool = _candidates(family, subjects[split])
            for c in rng.sample(pool, min(per_family[split], len(pool))):
                records.append({"prompt": c.prompt(), "family": family, "subject": c.subject, "param": c.param})
        rng.shuffle(records)
        out[split] = [{"id": f"{split}-{i:04d}", **r} for i, r in enumerate(records)]
    return out


def generate_shift_prompts(seed: int = 0, count: int = 40, families: tuple[str, ...] = SHIFT_FAMILIES) -> list[dict]:
    """Prompt records (as :func:`generate_prompts` writes them) of the families kept out of training, on the
    held-out subjects of ``seed``: neither their family nor their topic occurs in the training prompts.

    Args:
        seed: Seed of the subject split (the one the training and held-out prompts were drawn with) and the draw.
        count: Prompts per family (capped by the family's distinct held-out prompts).
        families: Families to draw from.
    """
    subjects = split_subjects(seed)["heldout"]
    rng = random.Random(f"{seed}-shift")
    records = []
    for family in families:
        pool = _candidates(family, subjects)
        for c in rng.sample(pool, min(count, len(pool))):
            records.append({"prompt": c.prompt(), "family": family, "subject": c.subject, "param": c.param})
    rng.shuffle(records)
    return [{"id": f"shift-{i:04d}", **r} for i, r in enumerate(records)]
