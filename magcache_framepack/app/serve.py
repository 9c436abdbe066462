"""Serving the app: its command line, the server, and ``main`` (what the demo scripts run).

``main()`` does all the work importing the package does not: it parses argv,
sets ``HF_HOME`` before anything imports huggingface_hub, loads the models (or
starts the Ray pool) and serves the page that
:func:`~magcache_framepack.app.layout.build_ui` builds.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from magcache_framepack.app.profiles import ProfileCatalog
from magcache_framepack.app.layout import DELETE_CACHE, build_ui
from magcache_framepack.settings import unwritable_folder

if TYPE_CHECKING:  # imported for annotations only; see the package docstring
    import gradio as gr

logger = logging.getLogger(__name__)

#: The checkout the package sits in, beside the demos: models download to its hf_download/ by default.
APP_DIR = pathlib.Path(__file__).resolve().parents[2]


def default_hf_home() -> pathlib.Path:
    """Where models download unless HF_HOME is set: FramePack's hf_download/ beside the demo scripts.

    In a checkout (the demos beside the package) that is the checkout's; a package installed
    with pip sits in site-packages, where downloads do not belong, so there it is the
    current folder's, as a user running a console script from a project folder expects.
    """
    if (APP_DIR / "magcache_demo_gradio.py").is_file():
        return APP_DIR / "hf_download"
    return pathlib.Path.cwd() / "hf_download"


def build_parser(variant: str) -> argparse.ArgumentParser:
    """The app's command line; the description names the variant as the page does."""
    from magcache_framepack.models import get_variant

    title = get_variant(variant).title
    parser = argparse.ArgumentParser(
        description=f"{title} with MagCache: the FramePack web app plus MagCache's cache controls.")
    parser.add_argument("--share", action="store_true",
                        help="also publish the app through a public Gradio share link")
    parser.add_argument("--server", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 = every "
                             "network interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument("--inbrowser", action="store_true", help="open the app in the default browser")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random-weight models on the CPU: no GPU, no download, the video is noise")
    parser.add_argument("--mag-ratios", metavar="FILE", default=None,
                        help="preselect this saved calibration profile (JSON) instead of the published ratios")
    parser.add_argument("--outputs", metavar="DIR", default="outputs",
                        help="folder for videos (default ./outputs)")
    parser.add_argument("--profiles", metavar="DIR", default="magcache_profiles",
                        help="folder of calibration profiles (default ./magcache_profiles)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", default=None,
                        help="run the jobs on a pool of Ray workers, one per GPU (several sessions at once); "
                             "without ADDRESS a local Ray, else a cluster ('auto' or host:port). "
                             "Needs: pip install -r requirements-ray.txt")
    parser.add_argument("--workers", type=int, metavar="N", default=None,
                        help="with --ray: number of workers (default one per GPU; with --tiny 2 CPU workers)")
    parser.add_argument("--max-retries", type=int, metavar="N", default=1,
                        help="with --ray: runs of a job again on a fresh worker after its worker died (default 1)")
    return parser


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (the address the app listens on by default)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sweep_folder(folder: str | os.PathLike[str], older_than: float) -> int:
    """Delete the files under ``folder`` put there over ``older_than`` seconds ago, and the folders that
    leaves empty; returns the bytes freed.  A file that goes away meanwhile is skipped.

    Age is the inode's change time, as Gradio's own cleaning judges it: Gradio copies a file into its
    cache keeping the original's modification time, and touches a copy it hands out again.
    """
    root = pathlib.Path(folder)
    cutoff = time.time() - older_than
    freed = 0
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):    # files before folders
        try:
            if path.is_dir():
                if path != root and not any(path.iterdir()):
                    path.rmdir()
            elif path.lstat().st_ctime < cutoff:
                size = path.lstat().st_size
                path.unlink()
                freed += size
        except OSError:
            continue
    return freed


def own_gradio_cache() -> str | None:
    """Give this process a Gradio cache folder of its own (unless GRADIO_TEMP_DIR names one), removed at exit.

    The app's cache can then be swept by age as a whole (:func:`start_cache_sweeper`): Blocks'
    ``delete_cache`` deletes only the files Gradio tracks, and it does not track those of a component
    that a session updated (a preview shown, a video kept, in both Gradio 5 and 6), so those would pile
    up.  Returns the folder, or None when the user chose one (which may hold other apps' files).
    """
    if os.environ.get("GRADIO_TEMP_DIR"):
        return None
    folder = tempfile.mkdtemp(prefix="magcache-gradio-")
    os.environ["GRADIO_TEMP_DIR"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def start_cache_sweeper(demo: gr.Blocks, folder: str | os.PathLike[str],
                        every_and_age: tuple[float, float]) -> threading.Thread:
    """Every ``every`` seconds, delete what in ``folder`` is over ``age`` seconds old, until ``demo`` closes.

    ``folder`` must belong to this app alone (see :func:`own_gradio_cache`): files are judged by age only.
    """
    every, age = every_and_age

    def sweep() -> None:
        seen_running = False
        while True:
            time.sleep(every)
            running = bool(getattr(demo, "is_running", False))
            if seen_running and not running:
                return                      # the server was closed
            seen_running = seen_running or running
            freed = sweep_folder(folder, age)
            if freed:
                logger.debug("Gradio cache: %d bytes of files over %g s old deleted", freed, age)

    thread = threading.Thread(target=sweep, name="gradio-cache-sweeper", daemon=True)
    thread.start()
    return thread


def launch(demo: gr.Blocks, *, server_name: str = "127.0.0.1", server_port: int | None = None,
           share: bool = False, inbrowser: bool = False, outputs_dir: str | os.PathLike[str] = "outputs",
           prevent_thread_lock: bool = False, quiet: bool = False,
           sweep_cache: tuple[float, float] | None = None) -> Any:
    """Start the server (shared by main() and the tests); only ``outputs_dir`` is served as files.

    ``sweep_cache`` (every, age) in seconds: also sweep Gradio's cache folder by age
    (:func:`start_cache_sweeper`); only for a folder this app owns (:func:`own_gradio_cache`).
    """
    if share or not _is_loopback(server_name):
        logger.warning("The app is reachable beyond this machine (%s): anyone who can open it can run jobs "
                       "on this GPU and read every video (and input image) in the outputs folder.",
                       "public share link" if share else f"listening on {server_name}")
    os.makedirs(outputs_dir, exist_ok=True)
    if sweep_cache is not None:
        from gradio.utils import get_upload_folder

        start_cache_sweeper(demo, get_upload_folder(), sweep_cache)
    return demo.launch(server_name=server_name, server_port=server_port, share=share, inbrowser=inbrowser,
                       allowed_paths=[str(pathlib.Path(outputs_dir).resolve())],
                       prevent_thread_lock=prevent_thread_lock, quiet=quiet, ssr_mode=False)


def main(variant: str, argv: Sequence[str] | None = None) -> None:
    """Parse ``argv``, load the models of ``variant`` ("framepack" or "f1") and serve the app."""
    parser = build_parser(variant)
    args = parser.parse_args(argv)
    for flag, folder in (("--outputs", args.outputs), ("--profiles", args.profiles)):
        problem = unwritable_folder(folder)      # before any model loads: a bad folder costs a line, not a start
        if problem is not None:
            parser.error(f"{flag} {folder}: cannot write there: {problem}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    own_cache = own_gradio_cache()        # before gradio names its cache folder
    # Like FramePack: models download next to the app unless the user chose a Hugging Face home.
    os.environ.setdefault("HF_HOME", str(default_hf_home()))

    from magcache_framepack.models import load_models, model_id
    import torch

    if args.mag_ratios:
        try:
            catalog = ProfileCatalog(variant, args.profiles, extra=args.mag_ratios,
                                     model=model_id(variant, args.tiny))
            catalog.load(catalog.choice_for(args.mag_ratios))
        except ValueError as exc:
            parser.error(f"--mag-ratios {args.mag_ratios}: {exc}")

    if not args.tiny and not torch.cuda.is_available() and args.ray is None:
        sys.exit(f"{parser.prog}: no CUDA GPU found. FramePack needs an NVIDIA GPU with CUDA. "
                 "To try the app without one, add --tiny (tiny random models on the CPU; the video is noise).")

    models = runner = None
    if args.ray is not None:
        runner = _ray_runner(parser, args, variant)
    else:
        logger.info("Loading %s models%s ...", variant, " (tiny, random weights)" if args.tiny else "")
        try:
            models = load_models(variant, tiny=args.tiny)
        except (RuntimeError, OSError) as exc:
            sys.exit(f"{parser.prog}: could not load the {variant} models: {exc}")
    demo = build_ui(models, variant, outputs_dir=args.outputs, profiles_dir=args.profiles,
                    mag_ratios=args.mag_ratios, tiny=args.tiny, runner=runner)
    launch(demo, server_name=args.server, server_port=args.port, share=args.share, inbrowser=args.inbrowser,
           outputs_dir=args.outputs, sweep_cache=DELETE_CACHE if own_cache else None)


def _ray_runner(parser: argparse.ArgumentParser, args: argparse.Namespace, variant: str) -> Any:
    """--ray: the pool of Ray workers the app's jobs run on (the models load there, not here)."""
    try:
        from magcache_framepack.runners.ray import require_ray, start_app_runner
        require_ray()
    except ImportError as exc:
        sys.exit(f"{parser.prog}: --ray: {exc}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.max_retries < 0:
        parser.error(f"--max-retries must be 0 or more, got {args.max_retries}")
    try:
        return start_app_runner(args.ray, variant, args.tiny, args.workers, args.max_retries)
    except (RuntimeError, ConnectionError) as exc:
        sys.exit(f"{parser.prog}: --ray: {exc}")


def main_framepack() -> None:
    """Console-script entry point: the FramePack app, arguments from the command line."""
    main("framepack")


def main_f1() -> None:
    """Console-script entry point: the FramePack-F1 app, arguments from the command line."""
    main("f1")
