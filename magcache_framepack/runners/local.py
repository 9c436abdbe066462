"""Running jobs in this process: the local runner the CLI uses (progress bars, Ctrl-C, output copies)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from magcache_framepack.jobfiles import job_settings, load_image

logger = logging.getLogger(__name__)


class _HideSamplerBars(io.TextIOBase):
    """stderr that drops the tqdm bar FramePack's sampler always draws (ours show the same steps)."""

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self.target = target

    def write(self, text: str) -> int:
        if "%|" not in text and "it/s]" not in text and "s/it]" not in text:
            self.target.write(text)
        return len(text)

    def flush(self) -> None:
        self.target.flush()


class _Progress:
    """tqdm bars for sections and for the steps of the current section."""

    def __init__(self, sections: int, steps: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.enabled = enabled
        self.steps = steps
        self.section = 0
        self.sections_bar = tqdm(total=sections, desc="sections", unit="section", position=0,
                                 disable=not enabled, file=sys.stderr, leave=True)
        self.steps_bar = tqdm(total=steps, desc="section 1 steps", unit="step", position=1,
                              disable=not enabled, file=sys.stderr, leave=False)

    def on_progress(self, update: Any) -> None:
        if update.step <= 0:
            self.sections_bar.set_postfix_str(update.desc.rstrip(" ."), refresh=True)
            return
        if update.section != self.section:
            self.section = update.section
            self.steps_bar.reset(total=self.steps)
            self.steps_bar.set_description(f"section {update.section + 1} steps")
        delta = update.step - self.steps_bar.n
        if delta > 0:
            self.steps_bar.update(delta)

    def on_section(self, report: Any) -> None:
        self.sections_bar.set_postfix_str(f"section {report.index + 1} written", refresh=False)
        self.sections_bar.update(1)

    def close(self) -> None:
        self.steps_bar.close()
        self.sections_bar.close()


class StopOnInterrupt:
    """First Ctrl-C asks the running job to stop (it keeps its partial video); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __call__(self) -> bool:
        return self.requested

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: finishing at the next step (Ctrl-C again to abort)")

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopOnInterrupt"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._previous)


def run_one(values: dict[str, Any], models_cache: dict[tuple[str, bool], Any], progress: bool,
            stop: Callable[[], bool]) -> tuple[Any, str | None]:
    """Generate one video; returns (JobResult, final video path)."""
    from magcache_framepack.job import run_job
    from magcache_framepack.settings import section_count
    from magcache_framepack.models import load_models
    from tqdm.contrib.logging import logging_redirect_tqdm

    settings = job_settings(values)
    image = load_image(values["image"])
    key = (values["variant"], values["tiny"])
    if key not in models_cache:
        logger.info("loading %s models%s", values["variant"], " (tiny)" if values["tiny"] else "")
        models_cache[key] = load_models(values["variant"], tiny=values["tiny"])
    bars = _Progress(section_count(settings.seconds, settings.latent_window_size),
                     settings.steps, enabled=progress)
    try:
        with logging_redirect_tqdm(), contextlib.redirect_stderr(_HideSamplerBars(sys.stderr)):
            result = run_job(models_cache[key], image, settings, outputs_dir=values["outputs_dir"],
                             on_progress=bars.on_progress, on_section=bars.on_section,
                             should_stop=stop, profiles_dir=values["profiles_dir"], image_path=values["image"])
    finally:
        bars.close()
    video = result.video_path
    if video and values["output"]:
        video = str(copy_video(video, values["output"]))
    return result, video


def copy_video(video: str | os.PathLike, output: str | os.PathLike) -> pathlib.Path:
    """Copy an MP4 and its JSON record to ``output`` (and ``output`` with .json): each appears only whole."""
    from magcache_framepack.records import atomic_target, sidecar_path

    out = pathlib.Path(output)
    for src, dst in ((sidecar_path(video), sidecar_path(out)), (video, out)):
        if pathlib.Path(src).is_file():
            with atomic_target(dst) as tmp:
                shutil.copyfile(src, tmp)
    return out
