"""``python -m magcache_framepack.bench ...``: the same tools as ``magcache_bench.py``, for a FramePack checkout."""

import sys

from magcache_framepack.bench import main

sys.exit(main())
