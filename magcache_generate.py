"""Generate FramePack videos with MagCache from the command line: ``python magcache_generate.py --help``.

A thin launcher: the command line is :mod:`magcache_framepack.cli`.
"""

import sys

if __name__ == "__main__":
    from magcache_framepack.cli import main

    sys.exit(main())
