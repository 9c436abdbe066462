"""The ``ratios`` tool: the ratio library's curves as a figure, and the skip plans they give as a table.

``python magcache_bench.py ratios [PROFILE.json ...] [--steps 25,50] [--out FILE.png]``

The figure shows why the library exists: the magnitude-ratio curve changes
with resolution and step count, so one published 25-step table stretched to
another step count plans different skips than a table measured there.  The
table counts the steps each preset computes both ways.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from magcache_framepack.bench.report import UsageError
from magcache_framepack.jobfiles import int_list
from magcache_framepack.settings import VARIANT_NAMES

def library_plan_rows(resolutions: Sequence[int] = (256, 512, 640), steps: Sequence[int] = (25, 50),
                      variants: Sequence[str] = VARIANT_NAMES) -> list[dict[str, Any]]:
    """Computed steps per preset: the library's table for each (resolution, steps) vs the published one stretched.

    "Stretched" is what a planner without the library does: the published
    640-px 25-step table fitted to the step count ("nearest" is the MagCache
    reference's stretch, "magnitude" this project's default fit).
    """
    import magcache_core as core

    rows = []
    for variant, res, n in itertools.product(variants, resolutions, steps):
        ratios, source = core.library_ratios(variant, res, n)
        row: dict[str, Any] = {"variant": variant, "resolution": res, "steps": n, "source": source}
        for preset, params in core.PRESETS.items():
            row[preset] = core.skip_schedule(ratios, n, *params).count(False)
            for mode in core.RESAMPLE_MODES:
                row[f"{preset} published ({mode})"] = core.skip_schedule(
                    core.VARIANT_MAG_RATIOS[variant], n, *params, resample=mode).count(False)
        rows.append(row)
    return rows


def library_plan_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: computed steps of each preset from the library vs the published table stretched."""
    import magcache_core as core

    head = ["variant", "px", "steps", "library table"]
    for preset in core.PRESETS:
        head += [f"{preset} library", f"{preset} published (magnitude / nearest)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], str(r["resolution"]), str(r["steps"]), r["source"]]
        for preset in core.PRESETS:
            cells += [str(r[preset]), f"{r[f'{preset} published (magnitude)']} / {r[f'{preset} published (nearest)']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_chart(path: str | os.PathLike, steps: Sequence[int] = (25,), profiles: Sequence[str] = ()) -> pathlib.Path:
    """The library's curves (one line per resolution and step count), one panel per variant, as a PNG.

    The x axis is the position in sampling (step / (steps - 1)), so tables of
    different step counts share it.  Profiles given are drawn dashed on their
    variant's panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import magcache_core as core

    variants = list(core.VARIANT_MAG_RATIOS)
    tables = [t for t in core.ratio_library() if t.steps in steps]
    if not tables:
        raise ValueError(f"the library has no table of {', '.join(map(str, steps))} steps: it holds "
                         f"{', '.join(map(str, sorted({t.steps for t in core.ratio_library()})))}")
    loaded = [(pathlib.Path(p).name, core.MagCacheProfile.load(p)) for p in profiles]
    resolutions = sorted({t.resolution for t in tables})
    cmap = plt.get_cmap("viridis")
    styles = {n: s for n, s in zip(sorted(steps), ("-", ":", "-."))}
    fig, axes = plt.subplots(1, len(variants), figsize=(6.0 * len(variants), 4.6), dpi=100, sharey=True)
    for ax, variant in zip(axes, variants):
        for t in (t for t in tables if t.variant == variant):
            colour = cmap(resolutions.index(t.resolution) / max(1, len(resolutions) - 1))
            xs = [i / max(1, t.steps - 1) for i in range(t.steps)]
            ax.plot(xs, t.ratios, styles.get(t.steps, "-"), color=colour, linewidth=1.2,
                    label=f"{t.resolution} px, {t.steps} steps" + (" (published)" if "published" in t.source else ""))
        for name, prof in loaded:
            if prof.variant == variant:
                xs = [i / max(1, prof.num_steps - 1) for i in range(prof.num_steps)]
                ax.plot(xs, prof.ratios, "--", color="black", linewidth=1.0,
                        label=f"{name} ({prof.resolution or '?'} px, {prof.num_steps} steps)")
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_title(f"{variant}: magnitude ratio per step", fontsize=10)
        ax.set_xlabel("position in sampling (step / (steps - 1))")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("ratio ||r_t|| / ||r_t-1||")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def positive_int_list(text: str) -> list[int]:
    """argparse type of step counts: :func:`~magcache_framepack.jobfiles.int_list`, each at least 1."""
    values = int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values



# ---------------------------------------------------------------------------
# The ratios subcommand
# ---------------------------------------------------------------------------

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``ratios``: its flags, and :func:`run` as what it does."""
    rp = subparsers.add_parser("ratios", help="draw the ratio library's curves (and profiles) and print its plan table")
    rp.add_argument("profiles", nargs="*", metavar="PROFILE", help="calibration profiles (JSON) to draw too")
    rp.add_argument("--steps", type=positive_int_list, default=[25],
                    help="which step counts' tables to draw (25,50,75)")
    rp.add_argument("--out", default="outputs/ratios.png", help="the PNG to write")
    rp.set_defaults(run=run)
    return rp


def run(args: argparse.Namespace) -> int:
    """Draw the figure, then print the plan table; step counts the library lacks are refused."""
    try:
        path = ratio_chart(args.out, steps=args.steps, profiles=args.profiles)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(library_plan_table(library_plan_rows()))
    print(f"\nwrote {path}")
    return 0
