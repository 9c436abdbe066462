"""MagCache for FramePack: benchmarks and video quality metrics.

Six tools, one subcommand each of ``magcache_bench.py`` (or
``python -m magcache_framepack.bench``)::

    python magcache_bench.py speed   [--size tiny|small|full] [--repeats N] [--setting T,K,R ...] [--json FILE]
    python magcache_bench.py compare REF.mp4 OTHER.mp4 [--json FILE]
    python magcache_bench.py sweep   --image IMG --prompt TEXT [--tiny] [--setting ...] [--out DIR]
    python magcache_bench.py ratios  [PROFILE.json ...] [--steps 25,50] [--out FILE.png]
    python magcache_bench.py plan-check [--size tiny|small] [--steps 25] [--seed 0] [--json FILE]
    python magcache_bench.py ray     [--jobs N] [--workers 1 2 ...] [--cpus N]

* :mod:`.speed`: FramePack's sampler over one section with random weights at
  a chosen size (``--size full`` is FramePack's real transformer on a GPU),
  uncached and under each MagCache setting; ``--model diffusers`` and
  ``--compare-diffusers`` time diffusers' pipeline and its own MagCache hook.
* :mod:`.quality`: ``compare``, and the metrics (PSNR, SSIM, LPIPS) it and
  ``sweep`` score videos with.
* :mod:`.sweep`: one real (or ``--tiny``) video uncached and one per setting,
  their speed-ups and their quality against the uncached one.
* :mod:`.ratios`: the ratio library's curves and the skip plans they give.
* :mod:`.ray_pool`: the Ray worker pool on 1, 2, ... CPU workers.
* :mod:`.plancheck`: ``plan-check``, whether the target planner's planned
  error ranks settings as the measured distance to the uncached run does.

Each tool module brings its own subcommand (``add_parser``, ``run``); this
face only wires them.  The tools import nothing of each other but
:mod:`.report` (the settings rows, argument types and JSON they share), except
that ``sweep`` scores with :mod:`.quality`'s metrics and ``plan-check`` samples
:mod:`.speed`'s random-weight model and section.  Each tool's decisions
worth knowing are in its module's docstring.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from magcache_framepack.bench import plancheck, quality, ratios, ray_pool, speed, sweep
from magcache_framepack.bench.report import UsageError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the exit code (2 for refused input, as argparse does)."""
    parser = argparse.ArgumentParser(prog="magcache_bench.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for tool in (speed, quality, sweep, ratios, ray_pool, plancheck):
        tool.add_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else getattr(args, "log_level", logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.run(args)
    except UsageError as exc:
        parser.error(str(exc))
