"""Benchmarks and video quality metrics: ``python magcache_bench.py {speed,compare,sweep,ratios,ray} --help``.

A thin launcher: the tools are :mod:`magcache_framepack.bench`.
"""

import sys

if __name__ == "__main__":
    from magcache_framepack.bench import main

    sys.exit(main())
