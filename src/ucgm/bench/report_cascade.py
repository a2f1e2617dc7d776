"""The cascade section of ``ucgm bench``: samples/s of a LowDiff-style cascade over a single-resolution model.

JSON keys: ``cascade`` (``{"throughput_ratio": r, "quality": {"cascade": v, "single": v}}``, digits FD, lower is
better) and ``cascade_details`` (every sampler's split, samples/s and quality; the chosen budget; whether the
target — ratio >= 1.5 at equal or better quality — is met). Protocol: :mod:`ucgm.bench.cascade`.
"""

from __future__ import annotations

from . import register_section
from .cascade import FULL, QUICK, run_cascade
from .throughput import single_thread

TARGET = 1.5


def run(quick: bool) -> dict:
    with single_thread():
        return run_cascade(QUICK if quick else FULL)


def markdown(report: dict) -> str:
    if "cascade" not in report:
        return ""
    result, details = report["cascade"], report["cascade_details"]
    lines = ["## LowDiff-style cascade: throughput at equal quality", "",
             f"Produced by `{report['meta']['command']}` ({'quick' if report['meta']['quick'] else 'full'} size, "
             f"{details['seconds']:.0f} s, one thread): `digits-cascade` (8x8 then 16x16, one UNet) against the "
             f"same UNet trained at 16x16 only at equal training compute ({details['training_steps']['cascade']} "
             f"cascade steps, {details['training_steps']['single']} single steps; "
             f"{details['train_seconds']['cascade']:.0f} s and {details['train_seconds']['single']:.0f} s); "
             f"{details['metric']} of "
             f"{details['sizes']['num']} samples; samples/s of batches of {details['sizes']['timing_batch']}, "
             "interleaved.", "",
             "| sampler | NFE | calls per level | digits FD | sliced W2 | samples/s |", "|---|---|---|---|---|---|"]
    for row in details["rows"]:
        split = "16x16 only" if row["steps_per_level"] is None else " + ".join(map(str, row["steps_per_level"]))
        lines.append(f"| {row['sampler']} | {row['nfe']} | {split} | {row['digits_fd']:.4g} | "
                     f"{row['sliced_w2']:.4g} | {row['samples_per_second']:.1f} |")
    verdict = "met" if details["met"] else "missed"
    lines += ["", f"Throughput ratio {result['throughput_ratio']:.2f} ({details['chosen']}, FD "
              f"{result['quality']['cascade']:.4g} vs single {result['quality']['single']:.4g}; "
              f"{'equal or better' if details['equal_or_better'] else 'worse'} quality): target >= {TARGET} at "
              f"equal or better quality {verdict}."]
    return "\n".join(lines)


register_section("cascade", run, markdown)
