"""Command help from docstrings: reStructuredText markup turned into plain text for ``--help``."""

from __future__ import annotations

import re

#: ``:func:`name``` style cross references (``~`` keeps only the last dotted component).
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(docstring: str) -> str:
    """``docstring`` without reST markup: ``:role:`target``` becomes ``target`` (its last component for
    ``~target``) and double-backquoted literals lose their backquotes."""
    text = _ROLE.sub(lambda match: match.group(2).rsplit(".", 1)[-1] if match.group(1) else match.group(2), docstring)
    return _LITERAL.sub(r"\1", text)
