"""The calibration tables one app offers, and the plan panel and ratio chart computed from them.

:class:`ProfileCatalog` lists the ratio library and the usable profiles of the
app's folder (by short labels), and loads the one a job asks for; the plan
panel and the chart plan with :func:`plan_config`, the job's own route to its
plan, so the page shows the plan that runs.
"""

from __future__ import annotations

import dataclasses
import functools
import datetime
import logging
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import magcache_core

from magcache_framepack.app.views import (
    LIBRARY, PUBLISHED, message_html, plan_message, plan_panel, profile_status_html, ratios_in_use_chart, SkipPlan,
    tradeoff_chart)
from magcache_framepack.settings import JobSettings

logger = logging.getLogger(__name__)


_PROFILE_NAME = re.compile(r"^[\w][\w.\-]*\.json$")

#: What starts the label of a profile made for the job's frames and steps (listed first; the dropdown's
#: info line says what the mark means).
FITS_MARK = "★ "


def profile_label(profile: magcache_core.MagCacheProfile) -> str:
    """A profile as the dropdown shows it: "FramePack · 128 px · 25 steps · 12-01 19:51".

    Variant, frame resolution (when the profile records it), steps and when it was calibrated: what
    tells two profiles apart, short enough for the dropdown (the file name is in the line under it).
    """
    from magcache_framepack.models import get_variant

    try:
        made = datetime.datetime.fromisoformat(profile.created).strftime("%m-%d %H:%M")
    except (TypeError, ValueError):
        made = str(profile.created)
    parts = [get_variant(profile.variant).title,
             *([f"{profile.resolution} px"] if profile.resolution else []), f"{profile.num_steps} steps", made]
    return " · ".join(parts)


class ProfileCatalog:
    """The calibration tables one app offers.

    The ratio library (a calibrated table for each job's resolution and step
    count, see :func:`magcache_core.library_ratios`), every usable ``*.json`` in
    the profiles folder and the file given with ``--mag-ratios``.  Usable means
    calibrated for this app's variant and model; the others are left out and
    counted (:meth:`left_out`).  A profile is named by its file name (in the
    folder) or its full path (the ``--mag-ratios`` file only); any other name is
    refused, so a client cannot make the server read arbitrary files.
    ``resolution`` is the frames' (height + width) / 2 a job of this app gets,
    which picks the library's table.
    """

    def __init__(self, variant: str, profiles_dir: str | os.PathLike[str],
                 extra: str | os.PathLike[str] | None = None, model: str | None = None,
                 resolution: float = 640) -> None:
        if variant not in magcache_core.VARIANT_MAG_RATIOS:
            raise ValueError(f"variant {variant!r}: must be one of {', '.join(magcache_core.VARIANT_MAG_RATIOS)}")
        self.variant = variant
        self.profiles_dir = pathlib.Path(profiles_dir).resolve()
        self.extra = pathlib.Path(extra).resolve() if extra else None
        self.model = model   # refuse profiles measured on another model (tiny random vs real weights)
        self.resolution = resolution

    def choice_for(self, path: str | os.PathLike[str]) -> str:
        """The dropdown value naming this profile file."""
        path = pathlib.Path(path).resolve()
        if path.parent == self.profiles_dir:
            return path.name
        return str(path)

    def _scan(self) -> tuple[list[tuple[pathlib.Path, magcache_core.MagCacheProfile]], dict[str, int]]:
        """(usable profiles, {reason: count} of the files left out).

        Usable is what the engine accepts (:meth:`magcache_core.MagCacheProfile.check`, which
        compares canonical model names), so the list offers exactly the profiles a job would run:
        one calibrated on the same checkpoint under another name (a Hub-cache path, diffusers'
        class of it) is offered, not left out.
        """
        paths = sorted(self.profiles_dir.glob("*.json")) if self.profiles_dir.is_dir() else []
        if self.extra is not None and self.extra not in paths:
            paths.append(self.extra)
        usable: list[tuple[pathlib.Path, magcache_core.MagCacheProfile]] = []
        left: dict[str, int] = {}
        for path in paths:
            try:
                prof = magcache_core.MagCacheProfile.load(path)
            except ValueError:
                left["not a readable profile"] = left.get("not a readable profile", 0) + 1
                continue
            try:
                prof.check(self.variant, self.model)
            except ValueError:
                # the count says which of the two checks refused it
                reason = (f"calibrated for {prof.variant}" if prof.variant != self.variant
                          else f"measured on {prof.model}")
                left[reason] = left.get(reason, 0) + 1
                continue
            usable.append((path, prof))
        return usable, left

    def choices(self, steps: int | None = None, resolution: float | None = None) -> list[tuple[str, str]]:
        """Dropdown entries: profiles made for a job like this one (resolution, steps) first, then the library.

        ``resolution`` is the job's frame resolution when its image is known (else this app's).
        """
        usable, _ = self._scan()
        resolution = resolution or self.resolution

        def fits(prof: magcache_core.MagCacheProfile) -> bool:
            near = magcache_core.pick_ratio_table(self.variant, resolution, prof.num_steps).resolution
            return prof.num_steps == steps and prof.resolution is not None and \
                magcache_core.pick_ratio_table(self.variant, prof.resolution, prof.num_steps).resolution == near

        labels = self._labels(usable)
        first = [(FITS_MARK + labels[path], self.choice_for(path))
                 for path, prof in usable if steps is not None and fits(prof)]
        rest = [(labels[path], self.choice_for(path))
                for path, prof in usable if not (steps is not None and fits(prof))]
        return first + [(self._library_label(), LIBRARY)] + rest

    def _library_label(self) -> str:
        """Short, like the profiles' labels: the dropdown's info line says what the library is."""
        from magcache_framepack.models import get_variant

        return f"Ratio library · {get_variant(self.variant).title}"

    @staticmethod
    def _labels(usable: Sequence[tuple[pathlib.Path, magcache_core.MagCacheProfile]]) -> dict[pathlib.Path, str]:
        """Each usable profile's dropdown label: :func:`profile_label`, with the file name added where two
        would read the same (so a label still names one file; the line under the dropdown names it too)."""
        labels = {path: profile_label(prof) for path, prof in usable}
        counts: dict[str, int] = {}
        for label in labels.values():
            counts[label] = counts.get(label, 0) + 1
        return {path: label if counts[label] == 1 else f"{label} · {path.name}" for path, label in labels.items()}

    def value_for(self, choice: str | None) -> str | None:
        """The dropdown value for ``choice``, which may be an entry's label instead of its value.

        Gradio 5's dropdown (custom values allowed, for a profile saved while the
        page is open) sends the text in its box, the label, when it loses focus
        after being opened: that names the same entry.  Anything else is returned
        as it is, for :meth:`path_for` to accept or refuse.
        """
        if choice is None:
            return None
        choice = str(choice)
        if choice == self._library_label():
            return LIBRARY
        if " · " in choice:
            for path, label in self._labels(self._scan()[0]).items():
                if choice in (label, FITS_MARK + label):
                    return self.choice_for(path)
        return choice

    def left_out(self) -> str:
        """A line saying how many files in the profiles folder are not offered, and why ("" if none)."""
        _, left = self._scan()
        if not left:
            return ""
        total = sum(left.values())
        why = "; ".join(f"{n} {reason}" for reason, n in sorted(left.items()))
        return f"{total} file(s) in {self.profiles_dir.name}/ left out, not usable by this app: {why}."

    def path_for(self, choice: str | None) -> pathlib.Path | None:
        """The file behind a dropdown value (or an entry's label); None for the ratio library."""
        choice = self.value_for(choice)
        if choice in (None, "", LIBRARY, PUBLISHED):
            return None
        choice = str(choice)
        if self.extra is not None and choice in (str(self.extra), self.extra.name):
            return self.extra
        if _PROFILE_NAME.match(choice):
            path = self.profiles_dir / choice
            if path.is_file():
                return path
        raise ValueError(f"unknown calibration profile {choice!r}: choose {LIBRARY!r} or a profile "
                         f"file in {self.profiles_dir}")

    def load(self, choice: str | None) -> magcache_core.MagCacheProfile | None:
        """The profile behind a dropdown value (None: the library); ValueError saying why one is refused."""
        path = self.path_for(choice)
        if path is None:
            return None
        profile = magcache_core.MagCacheProfile.load(path)
        try:
            profile.check(self.variant, self.model)
        except ValueError as exc:
            raise ValueError(f"{path.name}: {exc}") from None
        return profile



def profile_status_update(note: str, left_out: str) -> Any:
    """The line under the profile dropdown as a component update: hidden when it has nothing to say, so
    no empty band sits under the dropdown (Gradio draws an HTML block's frame even when it is empty)."""
    import gradio as gr

    html_text = profile_status_html(note, left_out)
    return gr.update(value=html_text, visible=bool(html_text))


def plan_config(catalog: ProfileCatalog, settings: JobSettings, profile_choice: str | None,
                resolution: float | None = None) -> magcache_core.MagCacheConfig:
    """The MagCache config a job of ``settings`` runs with this table choice: the page plans from it too.

    It is :func:`magcache_framepack.job.magcache_config`, the function the job
    itself plans with, on the same table (the chosen profile's file, else the
    library's table for the frames), so the plan the page shows is the plan that
    runs.  ``resolution``: the job's frame resolution; None before an image is
    known (this app's default frames).  A refused profile raises ValueError.
    """
    from magcache_framepack.job import magcache_config

    path = catalog.path_for(profile_choice)
    if path is not None:
        catalog.load(profile_choice)      # refuses as a Start would, naming the file
    settings = dataclasses.replace(settings, mag_ratios=str(path) if path is not None else None)
    return magcache_config(settings, catalog.variant, catalog.model, resolution or catalog.resolution)


def table_source(catalog: ProfileCatalog, profile_choice: str | None, config: magcache_core.MagCacheConfig) -> str:
    """Where the page says a plan's ratios come from: the user's profile, or the library's sentence."""
    if config.profile is None:
        return config.source or ""
    return f"your profile {catalog.choice_for(catalog.path_for(profile_choice))}"


def profile_selection(catalog: ProfileCatalog, choice: str | None) -> tuple[str, str, str, str | None]:
    """What selecting a calibration table shows: (dropdown value, status text, chart, warning or None).

    A refused profile (unreadable, or calibrated for the other variant) puts the
    dropdown back on the ratio library and says why, once.
    """
    try:
        prof = catalog.load(choice)
    except ValueError as exc:
        return (LIBRARY, f"**Refused:** {exc}. Using the ratio library.",
                ratios_chart_html(catalog, LIBRARY), f"Calibration profile refused: {exc}")
    choice = catalog.value_for(choice)
    note = ("" if prof is None else
            f"Using profile {choice}: {prof.num_steps} steps, {prof.runs} run(s), created {prof.created}.")
    return str(choice or LIBRARY), note, ratios_chart_html(catalog, choice), None


def plan_panel_html(catalog: ProfileCatalog, cache: str, steps: float, magcache_thresh: float,
                    magcache_K: float, retention_ratio: float, profile_choice: str | None,
                    calibrate: bool, cfg: float = 1.0, resample: str = "magnitude",
                    resolution: float | None = None, target_speedup: float | None = None,
                    latent_window_size: int = 9) -> str:
    """The live skip-plan panel for the current settings, and the table it comes from (never raises).

    ``resolution`` is the job's frame resolution, (height + width) / 2 of the bucket its image gets
    (:func:`image_frame_resolution`); None before an image is known: the app's default frames.
    With ``target_speedup`` the plan is the planner's choice for it, as the job's; under the plan,
    the trade-off of the planner's candidates on this table, with the plan that runs marked.
    """
    message = plan_message(cache, int(steps), calibrate)
    if message is not None:
        return message
    try:
        settings = JobSettings(prompt="", steps=int(steps), magcache_thresh=float(magcache_thresh),
                               magcache_K=int(round(float(magcache_K))), retention_ratio=float(retention_ratio),
                               cfg=float(cfg), resample=str(resample), target_speedup=target_speedup,
                               latent_window_size=int(latent_window_size))
        config = plan_config(catalog, settings, profile_choice, resolution)
    except ValueError as exc:
        return message_html(f"No plan: {exc}")
    plan = SkipPlan(tuple(config.schedule()), branches=2 if float(cfg) > 1.0 else 1)
    return (plan_panel(plan, table_source(catalog, profile_choice, config), config.profile is not None, int(steps),
                       resolution, catalog.resolution)
            + tradeoff_html(config, target_speedup))


@functools.lru_cache(maxsize=32)
def tradeoff_curve_of(ratios: tuple[float, ...], steps: int, resample: str, cosine_distance: tuple[float, ...] | None,
                      step_weights: tuple[float, ...] | None) -> list[tuple[float, float]]:
    """The planner's trade-off curve of one table: a function of the tables alone, so it is computed once
    per table (searching the 1,280 candidates takes some 11 ms; the plan panel redraws on every slider move)."""
    return magcache_core.tradeoff_curve(magcache_core.plan_candidates(
        list(ratios), steps, resample, cosine_distance=cosine_distance, step_weights=step_weights))


def tradeoff_html(config: magcache_core.MagCacheConfig, target_speedup: float | None) -> str:
    """The planner's trade-off on this config's table (speedup against planned error), this plan marked."""
    tables = {name: tuple(values) if values is not None else None for name, values in config.error_tables().items()}
    curve = tradeoff_curve_of(tuple(config.mag_ratios), config.num_steps, config.resample, **tables)
    current = (config.num_steps / max(1, config.schedule().count(False)), config.planned_error())
    return tradeoff_chart(curve, current, target_speedup)


def ratios_chart_html(catalog: ProfileCatalog, profile_choice: str | None, steps: int = 25,
                      resample: str = "magnitude", resolution: float | None = None) -> str:
    """Chart of the ratio table in use (the library's when the choice is refused), next to the published one."""
    settings = JobSettings(prompt="", steps=int(steps), resample=resample)
    try:
        config = plan_config(catalog, settings, profile_choice, resolution)
    except ValueError:
        profile_choice = LIBRARY
        config = plan_config(catalog, settings, LIBRARY, resolution)
    return ratios_in_use_chart(catalog.variant, config.mag_ratios, table_source(catalog, profile_choice, config))
