"""``ucgm bench``: speed and quality targets measured side by side, written as JSON and a markdown table.

Sections register a function ``run(quick) -> dict`` whose keys are merged into the JSON report; each section
also contributes markdown via ``markdown(results) -> str``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from ..atomic import atomic_write_text
from ..cli.help_text import plain_text


class Section(NamedTuple):
    run: Callable[[bool], dict]
    markdown: Callable[[dict], str]
    in_quick: bool = True


SECTIONS: dict[str, Section] = {}


def register_section(name: str, run: Callable[[bool], dict], markdown: Callable[[dict], str],
                     in_quick: bool = True) -> None:
    """Add a benchmark section (run in registration order); ``in_quick=False`` leaves it out of ``--quick`` runs
    that do not name it in ``--sections``."""
    SECTIONS[name] = Section(run, markdown, in_quick)


def _register_builtin_sections() -> None:
    from . import report_core  # noqa: F401  (registers "core")
    from . import report_quality  # noqa: F401  (registers "quality")
    from . import report_trainer  # noqa: F401  (registers "trainer")
    from . import report_consistency  # noqa: F401  (registers "consistency")
    from . import report_discrete  # noqa: F401  (registers "discrete")
    from . import report_cascade  # noqa: F401  (registers "cascade")
    from . import report_search  # noqa: F401  (registers "search")
    from . import report_distribution_matching  # noqa: F401  (registers "distribution_matching")
    from . import report_flow_maps  # noqa: F401  (registers "flow_maps")
    from . import report_reliability  # noqa: F401  (registers "reliability", not in --quick)


def run_benchmarks(quick: bool, sections: Optional[list[str]] = None) -> dict:
    """Run the chosen sections (all by default; with ``quick`` those registered ``in_quick``) and return the
    merged report."""
    _register_builtin_sections()
    chosen = [name for name, section in SECTIONS.items() if section.in_quick or not quick] if not sections \
        else sections
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown benchmark section(s) {unknown}; allowed: {', '.join(SECTIONS)}")
    report: dict = {"meta": {"quick": quick, "torch": torch.__version__, "python": platform.python_version(),
                             "threads": torch.get_num_threads(), "command": "ucgm " + " ".join(sys.argv[1:]),
                             "date": time.strftime("%Y-%m-%d %H:%M:%S")}}
    for name in chosen:
        started = time.perf_counter()
        report.update(SECTIONS[name].run(quick))
        report["meta"].setdefault("section_seconds", {})[name] = round(time.perf_counter() - started, 1)
    return report


def render_markdown(report: dict) -> str:
    """The report as markdown: one table per section present in it."""
    lines = ["# ucgm benchmark", "", f"Command: `{report['meta']['command']}` "
             f"(torch {report['meta']['torch']}, {report['meta']['threads']} threads, {report['meta']['date']})", ""]
    for section in SECTIONS.values():
        text = section.markdown(report)
        if text:
            lines += [text, ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ucgm bench", description=plain_text(__doc__))
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions (about a minute)")
    parser.add_argument("--out", default="benchmarks/bench.json", help="JSON report path; a .md table is written beside")
    parser.add_argument("--sections", default=None, help="comma-separated subset of sections (default: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: stable ratios when other processes share the cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",") if args.sections else None
    report = run_benchmarks(args.quick, sections)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2, sort_keys=False) + "\n")
    markdown = render_markdown(report)
    atomic_write_text(out.with_suffix(".md"), markdown + "\n")
    print(markdown)
    return 0
