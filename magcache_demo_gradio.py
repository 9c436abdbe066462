"""FramePack (sections sampled backwards, lllyasviel/FramePackI2V_HY) with MagCache.

Run ``python magcache_demo_gradio.py --help``; without an NVIDIA GPU try ``--tiny``.
All the app's code is in magcache_framepack/app/, shared with magcache_demo_gradio_f1.py.
"""

VARIANT = "framepack"

if __name__ == "__main__":
    from magcache_framepack.app import main

    main(VARIANT)
