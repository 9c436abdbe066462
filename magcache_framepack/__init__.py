"""MagCache for FramePack: jobs, apps and tools around the engine (``magcache_core.py``).

The engine is the one file beside this package and knows nothing of it.  The
package is built in layers; a module imports only from its own layer or the
layers below, never in a circle (``tests/test_layout.py`` checks both), and
importing the package does no work:

1. ``settings``: a job's settings, their limits and names (no torch).
2. ``models``: FramePack's code, the two variants, real and tiny model loading.
3. the job: ``video`` (the MP4 writer), ``records`` (how each video was made),
   ``metrics`` (PSNR / SSIM / LPIPS of two videos), ``sensitivity`` (how much
   each step's output weighs in FramePack's sampled latent: the target
   planner's step weights), ``job`` (the section loop),
   ``comparison`` (a cached video against its uncached twin), ``grid`` (the
   cache's settings grid: its cells, rows and exports).
4. ``jobfiles``: job files and the values a command line or a record gives.
5. runners: ``runners.local`` (this process), ``runners.ray`` (a Ray pool).
6. front ends: ``app`` (the Gradio app), ``cli`` (``magcache_generate.py``),
   ``bench`` (``magcache_bench.py``: one module per tool, sharing ``bench.report``).

Where to add things: a model class MagCache patches is an adapter in
``magcache_core``; another way to run jobs is a module in ``runners``; another
front end is a module in layer 6.
"""
