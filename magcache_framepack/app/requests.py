"""What a client sent, made into a job's values: typed, moved into range as Start does, or refused in one line.

The image input (an upload that is not an image arrives as
:class:`UnreadableImage`), the numbers (:func:`typed_settings`, then
:func:`into_range`), and the two places Gradio itself would refuse a request
with a traceback (:func:`raw_when_refused`, :func:`refusals_in_one_line`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from typing import Any

import magcache_core

from magcache_framepack.settings import LIMITS, JobSettings, setting_name

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UnreadableImage:
    """What the image input hands the job when the uploaded file is not an image it can decode."""

    name: str

    @property
    def message(self) -> str:
        from magcache_framepack.job import IMAGE_FORMATS

        return f"{self.name} is not a readable image: use a {IMAGE_FORMATS} file."


def image_frame_resolution(path: Any, bucket_resolution: int) -> float | None:
    """(height + width) / 2 of the frames a job of this image file gets (its bucket), or None if unreadable.

    Reads only the image header; the library picks its ratio table by this value, so the page
    plans as the job will.
    """
    from PIL import Image, UnidentifiedImageError

    from magcache_framepack.job import find_bucket

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        return None
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return magcache_core.frame_resolution(*find_bucket(height, width, bucket_resolution))


def checked_image(component: Any) -> Any:
    """Make this image input hand the job an :class:`UnreadableImage` when an upload cannot be decoded.

    Gradio decodes an upload before the event function runs; a text file named
    .png then fails inside Gradio with an opaque error and a traceback.  This
    wraps the one instance's ``preprocess`` (a subclass would make Gradio 5
    write a stub file beside this module) so the job can say what is wrong.
    """
    from PIL import Image, UnidentifiedImageError

    decode = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return decode(payload)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            name = getattr(payload, "orig_name", None) or pathlib.Path(str(getattr(payload, "path", "") or
                                                                           "the upload")).name
            logger.debug("upload %s is not a readable image", name)     # the job says so, once
            return UnreadableImage(name)

    component.preprocess = preprocess
    return component


def raw_when_refused(component: Any) -> Any:
    """Make this input hand the job the value a client sent when Gradio's own check refuses it.

    Gradio 6's sliders refuse a number beyond their range (Gradio 5's pass it on), and its
    numbers and radios refuse a value of the wrong type, before the event function runs: the
    client gets Gradio's message, or none, and the server log a traceback.  The job's rule is
    the page's (:func:`into_range` moves numbers into range; anything else is refused with a
    message naming the input), so this one instance's ``preprocess`` passes such a value on
    for :meth:`AppEvents.run` to move or refuse, in one line.
    """
    check = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return check(payload)
        except Exception:  # noqa: BLE001 - Gradio's Error, or TypeError for a wrong type: the job says why
            return payload

    component.preprocess = preprocess
    return component


def refusals_in_one_line(demo: Any) -> Any:
    """Make Gradio's refusals of an event's inputs one log line and a message for the client.

    Before any event function runs, Gradio checks that a file input is a file the client
    uploaded, in the shape of its file data: a path such as /etc/passwd, or a bare string, is
    refused there with a traceback in the server log, and (not being a ``gradio.Error``) the
    client is told nothing (``{"error": null}``).  This wraps the one app's ``preprocess_data``,
    the step both Gradio 5 and 6 run those checks in, so such a refusal becomes
    ``gradio.Error(reason, print_exception=False)`` and one INFO line.  Other exceptions (not
    about the request) keep their traceback.
    """
    import gradio as gr

    check = demo.preprocess_data

    async def preprocess_data(block_fn: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await check(block_fn, inputs, *args, **kwargs)
        except (gr.Error, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:   # malformed data
            reason = input_refusal(exc)
            logger.info("Refused a request to /%s: %s", getattr(block_fn, "api_name", None) or "?", reason)
            raise gr.Error(reason, print_exception=False) from None

    demo.preprocess_data = preprocess_data
    return demo


def input_refusal(exc: BaseException) -> str:
    """One line saying why Gradio refused a request's inputs (see :func:`refusals_in_one_line`)."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and hasattr(exc, "title"):       # pydantic: the value is not Gradio's file data
        first = (errors() or [{}])[0]
        return (f"{exc.title}: {first.get('msg', 'not valid')}, got {first.get('input')!r:.200}; "
                "send a file as an upload (gradio_client: handle_file(path))")
    text = str(getattr(exc, "message", None) or exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, ValueError) or hasattr(exc, "message"):     # a ValueError or gradio.Error says why itself
        return line
    return f"the request's inputs are malformed ({type(exc).__name__}: {line})"


#: What the target speedup box holds when no target is asked for: empty (None, "") or 0 (what an
#: empty number box sends from a browser).
NO_TARGET = (None, "", 0)


def typed_settings(prompt: Any, n_prompt: Any, seed: Any, total_second_length: Any, latent_window_size: Any,
                   steps: Any, cfg: Any, gs: Any, rs: Any, gpu_memory_preservation: Any, cache: Any,
                   magcache_thresh: Any, magcache_K: Any, retention_ratio: Any, calibrate: Any, mp4_crf: Any,
                   resample: Any, profile_path: pathlib.Path | None, target_speedup: Any = None) -> JobSettings:
    """The settings a UI or API client typed, as numbers, before they are moved into the limits.

    :func:`into_range` then moves them as the page's Start does, so the job, the page and the
    report all show the values that really ran.  A value that is not a number, or a Calibrate
    that is not true or false, raises ValueError (TypeError) naming the input and what it accepts.
    The page and the /generate endpoint keep FramePack's names for two inputs,
    ``total_second_length`` and ``mp4_crf``, so API clients keep working; this is
    the one place they become JobSettings' ``seconds`` and ``crf``.  ``target_speedup`` (empty or
    0: none) plans the threshold, K and retention of a MagCache job; with another cache, or a
    calibration, it does not apply and is dropped (the page's plan panel says which plan runs).
    """
    if not isinstance(calibrate, bool):
        raise TypeError(f"calibrate = {calibrate!r}: must be true or false")
    sent = {"seed": seed, "total_second_length": total_second_length, "latent_window_size": latent_window_size,
            "steps": steps, "cfg": cfg, "gs": gs, "rs": rs, "gpu_memory_preservation": gpu_memory_preservation,
            "magcache_thresh": magcache_thresh, "magcache_K": magcache_K, "retention_ratio": retention_ratio,
            "mp4_crf": mp4_crf}
    numbers = {setting_name(shown): typed_number(setting_name(shown), value, shown) for shown, value in sent.items()}
    if target_speedup not in NO_TARGET and str(cache) == "magcache" and not calibrate:
        numbers["target_speedup"] = typed_number("target_speedup", target_speedup, "target_speedup")
    return JobSettings(prompt=str(prompt or ""), n_prompt=str(n_prompt or ""), cache=str(cache),
                       mag_ratios=str(profile_path) if profile_path else None, calibrate=calibrate,
                       resample=str(resample), **numbers)


def typed_number(name: str, value: Any, shown: str) -> int | float:
    """The number a client sent for the setting ``name`` (its input is called ``shown``), not yet in range.

    Integers stay exact (a seed near 2**63 survives); a number in a string is read as one; anything
    else raises ValueError saying what the input accepts (:data:`LIMITS`).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    try:
        number = float(value) if isinstance(value, (float, str)) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{shown} = {value!r}: {LIMITS[name].describe()}")
    return number


def into_range(typed: JobSettings) -> tuple[JobSettings, dict[str, dict[str, Any]]]:
    """``typed`` moved into :data:`LIMITS` as the page's Start moves it, and what moved.

    The second item is ``{setting: {"given": value sent, "used": value run}}`` for each value
    that changed (JobSettings' names, as in the report's settings); the report carries it so
    an API client sees what its job ran with.
    """
    settings = typed.clamped()
    moved = {name: {"given": getattr(typed, name), "used": getattr(settings, name)} for name in LIMITS
             if getattr(typed, name) != getattr(settings, name)}
    return settings, moved


def with_moves(report: Any, moved: dict[str, dict[str, Any]]) -> Any:
    """The job report with ``moved_into_range`` (see :func:`into_range`); a page update passes unchanged."""
    if not isinstance(report, dict) or "__type__" in report:
        return report
    return {**report, "moved_into_range": moved}


#: The number boxes Start moves into their limits, in the order :meth:`AppEvents.clamp_at_start` takes them.
CLAMPED_NAMES = ("seed", "seconds", "steps", "cfg", "gs", "crf", "magcache_thresh",
                 "magcache_K", "retention_ratio", "gpu_memory_preservation")
