"""Every ``ucgm`` command's ``--help``: help text on every option, no reStructuredText markup, one name per
concept (``--nfe`` for network evaluations, ``--labels`` for class labels)."""

from __future__ import annotations

import argparse

import pytest

from ucgm.cli import COMMANDS, main
from ucgm.cli.help_text import plain_text


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


@pytest.fixture
def capture_parser(monkeypatch):
    """Stop a command at argument parsing and hand back its parser."""
    def stop(self, *args, **kwargs):
        raise _Parsed(self)

    for name in ("parse_args", "parse_intermixed_args", "parse_known_args", "parse_known_intermixed_args"):
        monkeypatch.setattr(argparse.ArgumentParser, name, stop)


def _parser_of(command: str) -> argparse.ArgumentParser:
    with pytest.raises(_Parsed) as parsed:
        main([command])
    return parsed.value.parser


def test_plain_text_removes_markup():
    assert plain_text("see :func:`ucgm.sampling.editing.edit` and :mod:`~ucgm.metrics.suites`, ``--nfe 2``") == \
        "see ucgm.sampling.editing.edit and suites, --nfe 2"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_no_markup(command, capture_parser):
    parser = _parser_of(command)
    missing = [action.option_strings or action.dest for action in parser._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not missing, f"ucgm {command}: options without help: {missing}"
    text = parser.format_help()
    assert "``" not in text and ":func:`" not in text and ":mod:`" not in text and ":class:`" not in text
    options = {option for action in parser._actions for option in action.option_strings}
    assert not options & {"--steps-per-sample", "--label", "--num-steps", "--sampling-steps"}
    if command in ("sample", "evaluate", "edit"):
        assert "--nfe" in options
    if command in ("sample", "edit"):
        assert "--labels" in options
