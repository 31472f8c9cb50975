"""Parser errors in one line: jsonargparse prints the whole usage (70-80 lines for ``rloo fit``) and then its
message; ``lit-route`` prints one line naming the option, with the closest valid name when it is misspelled."""

from __future__ import annotations

import contextlib
import re


class UsageError(Exception):
    """A command line or config the parser refused, in one line."""


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
    ours = [line for line in lines if re.match(r"^[\w.\[\]]+: expected ", line)]  # lit_route.checks' format
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
        raise UsageError(usage_line(str(message), list(target._option_string_actions)))

    ArgumentParser.error = error
    try:
        yield
    finally:
        ArgumentParser.error = original
