"""Errors in one line: jsonargparse prints the whole usage (70-80 lines for ``rloo fit``) and then its message;
``lit-route`` prints one line naming the option, with the closest valid name when it is misspelled.

The line comes from the chain of exceptions (``__cause__``/``__context__``) where it can: lit_route's own message
(``name: expected ...``) wherever jsonargparse wrapped it, or the class path that cannot be imported. The text of
jsonargparse's aggregated message (whose layout depends on the order in which it tried a union's members) is the
fallback only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
from types import ModuleType


class UsageError(Exception):
    """A command line or config the parser refused, in one line."""


def _checks_lines(lines: list[str]) -> list[str]:
    """The lines in :mod:`lit_route.checks`' format (``name: expected ...``), stripped of jsonargparse's indent."""
    return [line.strip(" -") for line in lines if re.match(r"^[\w.\[\]]+: expected ", line.strip(" -"))]


def usage_line(message: str, options: list[str]) -> str:
    """One line for a parser's error ``message``: an unknown option with the closest valid one in ``options``; a
    message of several lines reduced to lit_route's own line in it (``name: expected ...``) or joined."""
    import difflib

    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    if unknown:
        given = unknown.group(1).split("=", 1)[0]
        line = f"unknown option {given}" if given.startswith("-") else f"unexpected argument {given!r}"
        close = difflib.get_close_matches(given, options, n=1, cutoff=0.6) if given.startswith("-") else []
        return line + (f" (did you mean {close[0]}?)" if close else "") + "; --help lists the options"
    unknown_key = re.search(r"(?:Group '([^']+)' )?does not accept option '([^']+)'|Option '([^']+)' is not accepted",
                            message)
    if unknown_key:  # a key of a config file (or a nested option) that no parser knows
        group, key = unknown_key.group(1), unknown_key.group(2) or unknown_key.group(3)
        given = f"{group}.{key}" if group else key
        keys = [o.removeprefix("--") for o in options if o.startswith("--")]
        close = difflib.get_close_matches(given, keys, n=1, cutoff=0.6)
        return f"unknown option {given}" + (f" (did you mean {close[0]}?)" if close else "") + "; --help lists the options"
    lines = [line.strip(" -") for line in message.strip().splitlines() if line.strip()]
    ours = _checks_lines(lines)
    if ours:
        return ours[0]
    key = re.match(r'^Parser key "([^"]+)":\s*(.*)$', lines[0]) if lines else None
    if key:  # 'Parser key "x": what' or 'Parser key "x":' and what on the next line
        return f"{key.group(1)}: {key.group(2) or (lines[1] if len(lines) > 1 else '')}".strip()
    return "; ".join(lines[:2]) if lines else message


@contextlib.contextmanager
def one_line_usage_errors():
    """jsonargparse prints the whole usage (70-80 lines for ``rloo fit``) before a refused option; within this
    block a parser that would exit raises :class:`UsageError` with one line instead. Parsers that raise on
    error (``exit_on_error=False``: inner parsers trying union types) are left alone."""
    from jsonargparse import ArgumentParser

    original = ArgumentParser.error

    def error(parser, message, ex=None):
        if not parser.exit_on_error:
            return original(parser, message, ex)
        target = getattr(ex, "subcommand_parser", None) or parser
        options = list(target._option_string_actions)
        raise UsageError((chain_line(ex) if ex is not None else None) or usage_line(str(message), options))

    ArgumentParser.error = error
    try:
        yield
    finally:
        ArgumentParser.error = original


def chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from (``__cause__``, else an unsuppressed ``__context__``),
    outermost first."""
    out, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return out


@functools.cache
def _package_dir(module: ModuleType) -> str:
    return os.path.dirname(os.path.realpath(module.__file__)) + os.sep


def raised_in(err: BaseException, package: ModuleType) -> bool:
    """Whether the innermost frame of ``err``'s traceback lies inside ``package``'s folder (by location: a
    virtual environment inside a folder that happens to be named ``lit_route`` is not lit_route)."""
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and os.path.realpath(last.tb_frame.f_code.co_filename).startswith(_package_dir(package))


def import_problem(path: str) -> str | None:
    """Why the class path ``path`` (``package.module.Class``, ``module.Class.Inner``) cannot be imported, in
    words; ``None`` when it can."""
    parts = path.split(".")
    missing = f"No module named {parts[0]!r}"
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and (module == err.name or module.startswith(err.name + ".")):
                missing = str(err)  # no such module (yet the class may be an attribute of a shorter prefix)
                continue
            return f"{type(err).__name__}: {err}"  # the module exists; something it imports does not
        except Exception as err:  # the module exists and fails to import
            return f"{type(err).__name__}: {err}"
        for depth in range(cut, len(parts)):
            if not hasattr(obj, parts[depth]):
                return f"{'.'.join(parts[:depth])} has no attribute {parts[depth]!r}"
            obj = getattr(obj, parts[depth])
        return None
    return missing


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else ""


def chain_line(err: BaseException) -> str | None:
    """One line for ``err`` taken from its chain of exceptions, or ``None`` when the chain holds nothing better
    than the outermost message:

    - a class path that cannot be imported: ``<option>: cannot import <class path> (<why>)``;
    - an error raised by lit_route (its checks name the option): its first line, or the line in the outermost
      jsonargparse message written in :mod:`lit_route.checks`' format when none is in the chain;
    - any other failure jsonargparse wrapped (in "Does not validate against any of the Union subtypes", say): the
      innermost reason, after the options (and the class path) it was found under: ``<option> (<class>): <why>``.
    """
    import jsonargparse

    import lit_route

    keys: list[str] = []  # the options jsonargparse descended through, outermost first
    classes: list[str] = []
    links = chain(err)
    for link in links:
        first = _first_line(link)
        if raised_in(link, jsonargparse):
            key = re.match(r'Parser key "([^"]+)"', first)
            if key and (not keys or keys[-1] != key.group(1)):
                keys.append(key.group(1))
            given = re.match(r"Problem with given class_path '([^']+)'", first)
            if given:
                classes.append(given.group(1))
                if isinstance(link.__cause__, ImportError | AttributeError):
                    problem = import_problem(given.group(1))
                    if problem:
                        return f"{'.'.join(keys) or 'class_path'}: cannot import {given.group(1)} ({problem})"
        elif raised_in(link, lit_route) and first:
            return first
    # jsonargparse links the failure of the first member of a union it tried; lit_route's message may be the
    # failure of another member, written only in the text
    ours = _checks_lines(str(err).splitlines()) if raised_in(err, jsonargparse) else []
    if ours:
        return ours[0]
    root = links[-1]
    if keys and len(links) > 1 and raised_in(root, jsonargparse):
        why = [line.strip() for line in str(root).strip().splitlines() if line.strip()]
        why = [line for line in why if not line.startswith("Parser key ")] or why
        where = ".".join(keys) + (f" ({classes[-1]})" if classes else "")
        if why and classes:  # a misspelled argument of that class: name the closest one
            why[0] = usage_line(why[0], _init_arguments(classes[-1]))
        return f"{where}: {why[0] if why else type(root).__name__}"
    return None


def _init_arguments(path: str) -> list[str]:
    """The ``__init__`` arguments of the class at ``path`` as options (none when it cannot be inspected)."""
    import inspect

    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [f"--{p}" for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except Exception:  # only a suggestion is lost
        return []
