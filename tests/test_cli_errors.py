"""Bad input a user meets, each refused with one line that names the file or the option (and the closest valid
option when one is misspelled), a non-zero exit, and no traceback; nothing is trained before the refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lit_route.cli import main

PM = ["pm", "fit", "--config", "configs/pm/debug_tiny.yaml"]
RLOO = ["rloo", "fit", "--config", "configs/rloo/debug_tiny.yaml"]
EVAL = ["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml"]


def one_line(argv, capsys, code=None) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == (code or stop.value.code) and stop.value.code != 0
    assert err and err[-1].startswith("lit-route: error: "), err
    assert not any(line.startswith(("usage:", "  File ")) for line in err), err  # no usage dump, no traceback
    return err[-1]


@pytest.mark.parametrize("argv, wrong, right", [
    ([*RLOO, "--model.bta", "0.1"], "--model.bta", "--model.beta"),
    ([*PM, "--model.hed=sngp"], "--model.hed", "--model.head"),
    ([*EVAL, "--ordr", "both"], "--ordr", "--order"),
    (["fabric", "pm", "--config", "configs/pm/debug_tiny.yaml", "--data.batch_sise", "4"], "--data.batch_sise",
     "--data.batch_size"),
    (["pm", "score", "--pm_ckt", "x.ckpt"], "--pm_ckt", "--pm_ckpt"),
])
def test_a_misspelled_option_is_one_line_with_the_closest_name(argv, wrong, right, capsys):
    # before: jsonargparse printed the whole usage (73 lines for `rloo fit`) and no suggestion
    line = one_line(argv, capsys, code=2)
    assert line == f"lit-route: error: unknown option {wrong} (did you mean {right}?); --help lists the options"


def test_a_misspelled_key_in_a_config_file_is_named_with_the_closest_name(tmp_path, capsys):
    extra = tmp_path / "mine.yaml"
    extra.write_text("model:\n  hed: sngp\n")
    line = one_line([*PM, "--config", str(extra)], capsys, code=2)
    assert "unknown option model.hed (did you mean model.head?)" in line


def test_a_value_of_the_wrong_type_is_one_line_naming_the_option(capsys):
    line = one_line([*PM, "--data.batch_size", "abc"], capsys, code=2)
    assert line.startswith("lit-route: error: data.batch_size: ") and "abc" in line


def test_debug_keeps_the_parsers_own_output(capsys):
    with pytest.raises(SystemExit) as stop:
        main([*RLOO, "--model.bta", "0.1", "--debug"])
    assert stop.value.code == 2 and len(capsys.readouterr().err.splitlines()) > 20  # the usage, as jsonargparse prints it


@pytest.mark.parametrize("argv", [
    [*PM, "--data.batch_size", "0"],
    [*RLOO, "--data.batch_size", "0"],
    ["fabric", "pm", "--config", "configs/pm/debug_tiny.yaml", "--data.batch_size", "0"],
])
def test_a_zero_batch_size_is_refused_by_name_before_torch_sees_it(argv, capsys):
    # before: `ValueError: batch_size should be a positive integer value, but got batch_size=0` from torch's
    # DataLoader, after the model had loaded
    assert one_line(argv, capsys, code=1).startswith("lit-route: error: data.batch_size: expected an integer > 0; got 0")


@pytest.mark.parametrize("name", ["empty.jsonl", "blank.jsonl", "empty.jsonl.gz"])
def test_an_empty_data_file_is_named(name, tmp_path, capsys):
    import gzip

    path = tmp_path / name
    text = "\n  \n" if name.startswith("blank") else ""
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    # before: `lit-route: error: StopIteration` (datasets' JSON reader on an empty file)
    line = one_line([*PM, "--data.train", f"[{path}]", "--trainer.default_root_dir", str(tmp_path / "run")], capsys)
    assert line.startswith(f"lit-route: error: {path}: no preference pairs in this file")
    line = one_line(["pm", "score", "--pm_ckpt", "x.ckpt", "--data", f"[{path}]", "--output", str(tmp_path / "s")],
                    capsys)
    assert f"{path}" in line


@pytest.mark.parametrize("content", [b"", b"garbage\n", "truncated"])
@pytest.mark.parametrize("engine", ["pm", "rloo", "fabric pm"])
def test_an_unreadable_resume_checkpoint_is_named_before_anything_loads(engine, content, tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    if content == "truncated":  # a real checkpoint cut short, as a killed copy leaves it
        import torch

        torch.save({"state_dict": {"w": torch.zeros(4096)}}, tmp_path / "whole.ckpt")
        content = (tmp_path / "whole.ckpt").read_bytes()[:5000]
    ckpt.write_bytes(content)
    config = "configs/rloo/debug_tiny.yaml" if engine == "rloo" else "configs/pm/debug_tiny.yaml"
    command = ["fabric", "pm"] if engine == "fabric pm" else [engine, "fit"]
    argv = [*command, "--config", config, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path / "r")]
    # before: `UnpicklingError: Weights only load failed ...`, `EOFError` or `RuntimeError: PytorchStreamReader
    # failed reading zip archive ...`, none naming the file
    line = one_line(argv, capsys, code=1)
    assert line.startswith(f"lit-route: error: ckpt_path: {ckpt} is ")
    assert not (tmp_path / "r").exists()  # refused before the run started


def test_a_cache_path_that_is_a_folder_is_named(tmp_path, capsys):
    folder = tmp_path / "cache"
    folder.mkdir()
    scores = tmp_path / "scores.jsonl"
    from lit_route.data import load_pairs

    pairs = load_pairs("bundled:llmbar/Natural.json", limit=4)
    scores.write_text("".join(json.dumps({"id": p.id, "score": 0.1, "uncertainty": 1.0}) + "\n" for p in pairs))
    # before: `lit-route: error: unable to open database file` (sqlite), no path
    line = one_line([*EVAL, "--pm_ckpt", "null", "--scores", str(scores), "--data", "[bundled:llmbar/Natural.json]",
                     "--limit_per_file", "4", "--cache", str(folder), "--output_dir", str(tmp_path / "e")],
                    capsys, code=1)
    assert line.startswith(f"lit-route: error: cache: {folder} is a folder; give a file path")


def test_a_routing_cache_path_that_is_a_folder_is_named(tmp_path, capsys):
    folder = tmp_path / "cache"
    folder.mkdir()
    # before: the run loaded the policy and the PM, then sqlite said `unable to open database file`
    argv = ["rloo", "fit", *RLOO[2:], "--trainer.callbacks.init_args.cache", str(folder),
            "--trainer.default_root_dir", str(tmp_path / "r")]
    assert one_line(argv, capsys).startswith(f"lit-route: error: cache: {folder} is a folder; give a file path")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("option, value, message", [
    ("max_calls_total", "-5", "max_calls_total: expected an integer >= 0; got -5"),
    ("fraction", "-0.5", "fraction: expected a number in [0, 1]; got -0.5"),
    ("max_spend_usd", "-1", "max_spend_usd: expected a number >= 0; got -1.0"),
])
@pytest.mark.parametrize("engine", ["rloo", "fabric rloo"])
def test_a_negative_budget_for_the_routing_callback_shows_the_projects_message(engine, option, value, message,
                                                                              capsys, tmp_path):
    command = ["fabric", "rloo"] if engine == "fabric rloo" else ["rloo", "fit"]
    argv = command + RLOO[2:] + [f"--trainer.callbacks.init_args.{option}", value,
                                 "--trainer.default_root_dir", str(tmp_path / "r")]
    assert one_line(argv, capsys) == f"lit-route: error: {message}  (--debug shows the traceback)"


def test_usage_line_picks_the_projects_message_out_of_a_union_error():
    from lit_route.cli import usage_line

    # jsonargparse's message when no member of a Union type accepts a value: the reason is an indented line
    message = ('Parser key "trainer.callbacks":\n  Does not validate against any of the Union subtypes\n  Subtypes: '
               "[list, NoneType]\n  Errors:\n    - Problem with given class_path 'lit_route.callbacks."
               "UncertaintyRouting':\n      - max_calls_total: expected an integer >= 0; got -5\n    - Expected a "
               "<class 'NoneType'>\n  Given value type: <class 'list'>")
    assert usage_line(message, []) == "max_calls_total: expected an integer >= 0; got -5"
    assert usage_line("unrecognized arguments: --modle.beta 1", ["--model.beta", "--model.lr"]) == (
        "unknown option --modle.beta (did you mean --model.beta?); --help lists the options")
    assert usage_line("unrecognized arguments: --zzz", ["--model.beta"]) == (
        "unknown option --zzz; --help lists the options")


SERVE = ["serve", "--config", "configs/serve/debug_tiny.yaml"]
ROOT = Path(__file__).resolve().parents[1]


def test_the_line_does_not_depend_on_the_folder_jsonargparse_is_installed_in(tmp_path):
    # a virtual environment inside a checkout named lit_route (`git clone ... lit_route; make test`): before, every
    # frame of jsonargparse counted as lit_route's own and the line was `Does not validate against any of the Union
    # subtypes`, the outermost jsonargparse message
    import jsonargparse

    site = tmp_path / "lit_route" / ".venv" / "site-packages"
    shutil.copytree(Path(jsonargparse.__file__).parent, site / "jsonargparse",
                    ignore=shutil.ignore_patterns("__pycache__"))
    program = ("import sys, jsonargparse; assert '/lit_route/.venv/' in jsonargparse.__file__; "
               "from lit_route.cli import main; main(sys.argv[1:])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    run = subprocess.run([sys.executable, "-c", program, *SERVE, "--judge.init_args.mode", "xyz", "--port", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines()[-1].startswith("lit-route: error: mode: expected one of"), run.stderr


@pytest.mark.parametrize("argv, line", [
    ([*SERVE, "--judge.class_path", "lit_route.judges.NoSuchJudge"],
     "judge: cannot import lit_route.judges.NoSuchJudge (lit_route.judges has no attribute 'NoSuchJudge')"),
    ([*SERVE, "--judge.class_path", "nosuchpkg.judges.Judge"],
     "judge: cannot import nosuchpkg.judges.Judge (No module named 'nosuchpkg')"),
    ([*RLOO, "--trainer.callbacks.init_args.judge.class_path", "lit_route.judges.NoSuchJudge"],
     "trainer.callbacks.judge: cannot import lit_route.judges.NoSuchJudge (lit_route.judges has no attribute "
     "'NoSuchJudge')"),
])
def test_a_judge_class_that_cannot_be_imported_is_named(argv, line, capsys):
    # before: `judge: Does not validate against any of the Union subtypes` (`trainer.callbacks: ...`)
    assert one_line(argv, capsys, code=2) == f"lit-route: error: {line}"


@pytest.mark.parametrize("command, config, where", [
    (SERVE, "cascade:\n  - fraction: 0.25\n", "cascade"),
    (RLOO, "trainer:\n  callbacks:\n    - class_path: lit_route.callbacks.UncertaintyRouting\n      init_args:\n"
           "        judge: {class_path: lit_route.judges.HFLocalJudge, init_args: {model_path: builtin:tiny-llama}}\n"
           "        cascade:\n          - fraction: 0.25\n", "trainer.callbacks.cascade"),
])
def test_a_cascade_item_without_a_judge_is_named(command, config, where, tmp_path, capsys):
    extra = tmp_path / "cascade.yaml"
    extra.write_text(config)
    # before: `cascade: Does not validate against any of the Union subtypes`
    assert one_line([*command, "--config", str(extra)], capsys, code=2) == (
        f"lit-route: error: {where} (lit_route.routing.cascade.CascadeStage): the following arguments are "
        "required: judge")


def test_a_misspelled_argument_of_a_judge_is_named_with_the_closest_name(capsys):
    # before: `unknown option modd; --help lists the options`, not saying whose option
    assert one_line([*SERVE, "--judge.init_args.modd", "logprob"], capsys, code=2) == (
        "lit-route: error: judge (lit_route.judges.HFLocalJudge): unknown option modd (did you mean mode?); "
        "--help lists the options")


def test_the_projects_message_wins_whichever_union_member_jsonargparse_links():
    # jsonargparse chains the failure of the union member it tried first: with `Callback` before `list[Callback]`,
    # that is "Not a valid subclass of Callback" and lit_route's own message is only in the text
    import lightning as L
    from jsonargparse import ArgumentParser

    from lit_route.cli import error_line
    from lit_route.usage import chain, raised_in

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=L.Callback | list[L.Callback] | None)
    judge = {"class_path": "lit_route.judges.ReplayJudge", "init_args": {"judge": "GPT-4"}}
    cfg = parser.parse_object({"callbacks": [{"class_path": "lit_route.callbacks.UncertaintyRouting",
                                              "init_args": {"judge": judge, "max_calls_total": -5}}]})
    with pytest.raises(ValueError) as refused:
        parser.instantiate_classes(cfg)
    import lit_route

    assert not any(raised_in(e, lit_route) for e in chain(refused.value))  # the scenario: ours is not chained
    assert error_line(refused.value) == "max_calls_total: expected an integer >= 0; got -5"


@pytest.mark.parametrize("argv, line", [
    ([*PM, "--trainer.accelerator", "gpu"], "trainer.accelerator: gpu needs a GPU and this machine has none"),
    ([*RLOO, "--trainer.accelerator", "cuda"], "trainer.accelerator: cuda needs a GPU and this machine has none"),
    (["fabric", "pm", "--config", "configs/pm/debug_tiny.yaml", "--trainer.accelerator", "gpu"],
     "trainer.accelerator: gpu needs a GPU and this machine has none"),
    ([*SERVE, "--device", "cuda"], "device: cuda needs a CUDA GPU and this machine has none"),
    ([*SERVE, "--judge.init_args.device", "cuda"], "HFLocalJudge.device: cuda needs a CUDA GPU and this machine"),
    ([*EVAL, "--device", "cuda:0"], "device: cuda:0 needs a CUDA GPU and this machine has none"),
    (["pm", "score", "--pm_ckpt", "x.ckpt", "--data", "[bundled:llmbar/Natural.json]", "--output", "s.jsonl",
      "--device", "cuda"], "device: cuda needs a CUDA GPU and this machine has none"),
])
def test_a_gpu_asked_for_on_a_machine_without_one_is_named(argv, line, tmp_path, monkeypatch, capsys):
    import torch

    # a CPU-only machine, whatever this one has
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if argv[0] in ("pm", "rloo", "fabric") and argv[1] != "score":
        argv = [*argv, "--trainer.default_root_dir", str(tmp_path / "r")]
    # before: `MisconfigurationException: No supported gpu backend found!` (`RuntimeError: ...` under Fabric) or,
    # once the model had loaded, `AssertionError: Torch not compiled with CUDA enabled`
    assert one_line(argv, capsys).startswith(f"lit-route: error: {line}")
    assert not (tmp_path / "r").exists()


def test_the_server_rollout_engine_names_its_url_when_nothing_answers_there(tmp_path, capsys):
    import socket

    # a port bound and not listening: connecting to it is refused, and nothing else can take it meanwhile
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{taken.getsockname()[1]}/v1"
        argv = [*RLOO, "--model.generation.engine", "server", "--model.generation.engine_options.base_url", url,
                "--model.generation.engine_options.max_attempts", "1",
                "--trainer.default_root_dir", str(tmp_path / "r")]
        line = one_line(argv, capsys, code=1)
    # before: `lit-route: error: connection: <urlopen error [Errno 111] Connection refused>`
    assert line.startswith(f"lit-route: error: generation.engine_options.base_url: nothing answers at {url} (")
    assert "start the vLLM server there" in line


def test_log_lines_go_to_sys_stderr_as_it_is_now(monkeypatch):
    import io
    import logging

    import lightning  # noqa: F401 (its console handler, bound to sys.stderr at import)

    from lit_route.cli import _setup_logging

    # before: the handlers kept the stream of the first run (in a test session, a capture closed since), and
    # later runs printed `--- Logging error --- ValueError: I/O operation on closed file` instead of their lines
    earlier = io.StringIO()
    monkeypatch.setattr(sys, "stderr", earlier)
    _setup_logging()
    earlier.close()
    for text in ("first host stream", "second host stream"):
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        _setup_logging()  # each run of main()
        logging.getLogger("lit_route.cli").warning(text)
        logging.getLogger("lightning.fabric.utilities.seed").warning(text)
        assert text in sys.stderr.getvalue() and "Logging error" not in sys.stderr.getvalue()
