"""FramePack-F1 (sections sampled forward, lllyasviel/FramePack_F1_I2V_HY_20250503) with MagCache.

Run ``python magcache_demo_gradio_f1.py --help``; without an NVIDIA GPU try ``--tiny``.
All the app's code is in magcache_framepack/app/, shared with magcache_demo_gradio.py.
"""

VARIANT = "f1"

if __name__ == "__main__":
    from magcache_framepack.app import main

    main(VARIANT)
