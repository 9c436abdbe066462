"""The last finished job again, without the cache: "Render without cache" and "Compare with no cache".

Explore fast, finish exact: a user tries ideas with the cache on, then either
renders the one they like without it (one click, same image, seed and
settings), or first compares the two to see what the cache cost.  A job is
reproducible (same settings, same frames), so the uncached rerun is the exact
reference the cached video approximates, and the comparison measures the
cache and nothing else (:mod:`magcache_framepack.comparison`).

Both actions are named API endpoints as well (``/render_without_cache`` and
``/compare``); like ``/end`` they act on the job the same client (its session)
ran last.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from magcache_framepack.app.jobs import JobRequest, SessionJobs
from magcache_framepack.app.handlers import AppEvents
from magcache_framepack.app.views import comparison_charts, comparison_markdown

logger = logging.getLogger(__name__)

#: What ``/compare`` returns after the five ``/generate`` outputs, in this order (the page's
#: compare panel, shown when they are filled, is a layout block: no API value).
COMPARE_OUTPUTS = ("cached_video", "uncached_video", "comparison_summary", "comparison_charts", "comparison")


def uncached_rerun(last: tuple[JobRequest, Any] | None) -> tuple[JobRequest | None, str]:
    """The request that reruns the last finished job with the cache Off, or (None, why not).

    A calibration run computes every step already, and a job run with the cache
    Off is its own uncached render: neither is run again.
    """
    if last is None:
        return None, ("Nothing to run again yet: finish a job with MagCache or TeaCache first (Start), then "
                      "compare it or render it without the cache.")
    request, result = last
    s = request.settings
    if s.cache == "off" or s.calibrate:
        why = "a calibration run, which computes every step" if s.calibrate else "run with the cache Off"
        return None, f"The last job was {why}: its video {result.video_path} is already the uncached render."
    uncached = dataclasses.replace(s, cache="off", calibrate=False, target_speedup=None)
    return dataclasses.replace(request, settings=uncached), ""


class RerunEvents:
    """The handlers of the two buttons (and endpoints), on top of one app's :class:`AppEvents`."""

    def __init__(self, events: AppEvents) -> None:
        self.events = events

    def render_without_cache(self, session: SessionJobs) -> Iterator[tuple[Any, ...]]:
        """The last finished job again with the cache Off, shown as any job is (the five /generate outputs)."""
        request, refusal = uncached_rerun(session.last_done)
        if request is None:
            yield self.events.refused(refusal)
            return
        yield from self.events.stream_job(session, request.settings, request.image, request.profile_choice)

    def compare(self, session: SessionJobs) -> Iterator[tuple[Any, ...]]:
        """Rerun the last job without the cache, then both videos side by side, their distance and times.

        Yields the five /generate outputs, the compare panel, then :data:`COMPARE_OUTPUTS`;
        the panel and its contents change only once the uncached video exists and was scored.
        """
        import gradio as gr

        from magcache_framepack.comparison import compare_runs, link_records

        unchanged = (gr.update(),) * (1 + len(COMPARE_OUTPUTS))      # the panel, then its contents
        last = session.last_done
        request, refusal = uncached_rerun(last)
        if request is None:
            yield (*self.events.refused(refusal), *unchanged)
            return
        cached = last[1]
        shown: tuple[Any, ...] = ()
        for shown in self.events.stream_job(session, request.settings, request.image, request.profile_choice):
            yield (*shown, *unchanged)
        uncached = session.last_done[1] if session.last_done else None
        if uncached is None or uncached is cached or not uncached.video_path:
            return                            # stopped or failed: the report above says so
        try:
            comparison = compare_runs(cached.video_path, uncached.video_path)
            link_records(comparison)
        except ValueError as exc:
            message = f"Cannot compare the two videos: {exc}"
            logger.info("%s", message)
            gr.Warning(message)
            yield (*shown, *unchanged)
            return
        summary = comparison.as_dict()
        logger.info("Compared %s with %s: %s", cached.video_path, uncached.video_path,
                    comparison_markdown(summary).splitlines()[1])
        yield (*shown, gr.update(visible=True), cached.video_path, uncached.video_path,
               comparison_markdown(summary), comparison_charts(summary), summary)
