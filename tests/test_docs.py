"""The README and docs/ say what runs: every ``lit-route`` command in a ``bash`` block parses through its CLI (its
config files exist, its options are valid), every benchmark command names a script and flags that exist, every
link resolves, and the README's five-minute tour runs as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def bash_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each ```bash block of a Markdown file."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if current is None and line.strip() == "```bash":
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands(path: Path) -> list[tuple[str, dict[str, str], list[str]]]:
    """(``file:line``, environment assignments, argv) of every command in a file's bash blocks; a line ending in
    ``\\`` continues on the next."""
    found = []
    for start, block in bash_blocks(path):
        joined = re.sub(r"\\\n", " ", block)
        for offset, line in enumerate(joined.splitlines()):
            words = shlex.split(line, comments=True)
            env = {}
            while words and ASSIGNMENT.match(words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if words and words[0] != "export":
                found.append((f"{path.relative_to(ROOT)}:{start + offset}", env, words))
    return found


ALL = [c for page in PAGES for c in commands(page)]
LIT_ROUTE = [c for c in ALL if c[2][0] == "lit-route"]


def parse(argv: list[str]) -> None:
    """Parses a ``lit-route`` argv with the command's own parser, instantiating nothing and running nothing."""
    from lightning.pytorch.cli import LightningCLI

    command, rest = argv[0], argv[1:]
    if command in ("pm", "rloo") and rest[0] in ("fit", "validate"):
        from lit_route.cli import pm_cli, rloo_cli

        original = LightningCLI.instantiate_classes
        LightningCLI.instantiate_classes = lambda self: None
        try:
            (pm_cli if command == "pm" else rloo_cli)(rest[1:], run=False)  # without the subcommand: parse only
        finally:
            LightningCLI.instantiate_classes = original
    elif command == "pm" and rest[0] == "score":
        from lit_route.cli import pm_score_cli

        pm_score_cli(rest[1:], run=False)
    elif command == "evaluate":
        from lit_route.eval.run import evaluate_cli

        evaluate_cli(rest, run=False)
    elif command == "fabric":
        from lit_route.fabric.cli import build_parser

        build_parser(rest[0]).parse_args(rest[1:])
    elif command == "export":
        from jsonargparse import ActionConfigFile, ArgumentParser

        from lit_route.artefacts.export import export

        parser = ArgumentParser(parser_mode="omegaconf", default_env=False)  # as export_cli builds it
        parser.add_argument("--config", action=ActionConfigFile)
        parser.add_function_arguments(export, as_positional=False)
        parser.parse_args(rest)
    else:  # a command this test does not parse yet: it must exist (its --help exits 0)
        from lit_route.cli import main

        try:
            main([command, "--help"])
        except SystemExit as stop:
            assert stop.code in (0, None), f"lit-route {command}: no such command"


def test_the_docs_have_commands_to_check():
    assert len(LIT_ROUTE) >= 25 and {c[2][1] for c in LIT_ROUTE} >= {"pm", "rloo", "evaluate", "fabric", "export"}


@pytest.mark.parametrize("where, env, argv", LIT_ROUTE, ids=[c[0] for c in LIT_ROUTE])
def test_every_documented_command_parses(where, env, argv, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for word in argv:
        if word.startswith("configs/"):
            assert (ROOT / word).is_file(), f"{where}: {word} does not exist"
    try:
        parse(argv[1:])
    except SystemExit as stop:  # --print_config prints and exits 0; a bad option exits 2
        assert stop.code == 0 and "--print_config" in argv, f"{where}: {shlex.join(argv)} exits {stop.code}"


def is_ours(argv: list[str]) -> bool:
    """A command of this repository's (a make target, a benchmark script, an install of lit-route's extras);
    another program's (a server, a launcher) is its own documentation's business."""
    return (argv[0] == "make" or (argv[0] == "python" and argv[1].startswith("benchmarks/"))
            or (argv[:2] == ["pip", "install"] and any(w.startswith(".[") for w in argv)))


OTHERS = [c for c in ALL if c[2][0] != "lit-route" and is_ours(c[2])]


@pytest.mark.parametrize("where, env, argv", OTHERS, ids=[c[0] for c in OTHERS])
def test_every_other_documented_command_names_what_exists(where, env, argv):
    if argv[0] == "make":
        targets = re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M)
        assert set(argv[1:]) <= set(targets), where
    elif argv[0] == "python":
        source = (ROOT / argv[1]).read_text()
        for flag in (w for w in argv[2:] if w.startswith("--")):
            assert f'"{flag}"' in source, f"{where}: {argv[1]} has no option {flag}"
    else:  # pip install -e '.[extra,...]'
        extras = re.search(r"^\[project\.optional-dependencies\]\n(.*?)^\[", (ROOT / "pyproject.toml").read_text(),
                           re.M | re.S).group(1)
        for word in (w for w in argv if w.startswith(".[")):
            for extra in word[2:-1].split(","):
                assert re.search(rf"^{extra} = ", extras, re.M), f"{where}: pyproject.toml has no extra {extra!r}"


CODE = re.compile(r"^```.*?^```|`[^`\n]*`", re.M | re.S)
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.M)


def anchors(page: Path) -> set[str]:
    """The ``#fragment`` each heading of a Markdown page gets on GitHub (lower case, punctuation dropped, spaces
    as hyphens, repeats numbered)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", CODE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        out.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of a Markdown page (inline or reference-style, outside code) whose file is missing or
    outside ``root``, or whose ``#fragment`` names no heading of the Markdown page it points to."""
    text = CODE.sub("", page.read_text())
    broken = []
    for target in INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page.resolve()
        found = file.exists() and file.is_relative_to(root.resolve())
        if not found or (fragment and file.suffix == ".md" and fragment not in anchors(file)):
            broken.append(target)
    return broken


def test_the_link_check_sees_every_kind_of_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A heading, with punctuation!\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("[a](other.md) [b](other.md#a-heading-with-punctuation) [c](#top) [d](https://x.org/y)\n"
                    "[e](missing.md#x) [f](other.md#no-such-heading) [g](../../outside.md) [h](#nowhere)\n"
                    "`[i](in-code.md)`\n\n# Top\n\n[j]: gone.md\n[k]: <other.md#other-page>\n")
    (tmp_path.parent / "outside.md").write_text("")
    assert broken_links(page, tmp_path) == ["missing.md#x", "other.md#no-such-heading", "../../outside.md",
                                            "#nowhere", "gone.md"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_and_named_files_exist(page):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: broken links {broken_links(page)}"
    for named in re.findall(r"`((?:configs|benchmarks|lit_route)/[\w/.-]+\.(?:yaml|py|md))`", page.read_text()):
        assert (ROOT / named).is_file(), f"{page.relative_to(ROOT)}: {named} does not exist"


# a finished last line: a sentence's end (maybe inside a parenthesis, emphasis, quotes or code), a table row, or
# the fence closing a code block
FINISHED = re.compile(r"([.!?][)*_`\"']*|\||^```)$")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_page_ends_with_a_finished_line(page):
    text = page.read_text()
    assert text.endswith("\n"), f"{page.relative_to(ROOT)}: no newline after its last line"
    last = text.rstrip().splitlines()[-1].strip()
    assert FINISHED.search(last), f"{page.relative_to(ROOT)} ends mid-sentence: {last!r}"


def test_every_docs_page_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    missing = [p.name for p in PAGES if p.parent.name == "docs" and p.name != "README.md" and f"({p.name})" not in index]
    assert not missing, f"docs/README.md does not list {missing}"


def test_the_readme_stays_an_introduction():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220  # the reference lives in docs/


def test_the_five_minute_tour_runs_as_written(tmp_path, monkeypatch):
    """The README's tour, command by command, in a fresh folder holding only the shipped configs."""
    from lit_route.cli import main

    lines = (ROOT / "README.md").read_text().splitlines()
    heading = lines.index("## A five-minute tour") + 1
    first = min(start for start, _ in bash_blocks(ROOT / "README.md") if start > heading)  # the tour's block
    end = next(n for n in range(first, len(lines) + 1) if lines[n - 1].strip() == "```")
    steps = [c for c in commands(ROOT / "README.md") if first <= int(c[0].rsplit(":", 1)[1]) < end]
    assert [s[2][1] for s in steps] == ["pm", "pm", "evaluate", "rloo", "fabric", "export"]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    for _, _, argv in steps:
        main(argv[1:])  # an error is SystemExit(1) with its one line on stderr
    results = tmp_path / "runs" / "eval_tour" / "results.json"
    assert results.is_file() and (tmp_path / "runs" / "scores.jsonl").stat().st_size > 0
    assert (tmp_path / "runs" / "pm_fabric" / "finalized.ckpt").is_file()
    assert (tmp_path / "runs" / "exported_pm" / "head.safetensors").is_file()
