"""The cache's settings grid (issue #16 item 3): its cells, its exports, and the app's Grid on a tiny model.

The cells are checked against values written out by hand; on the app, every
cell's video must be the one a single /generate with the same settings gives,
and End must stop the grid with the finished cells kept.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pathlib
import time
from typing import Any

import numpy as np
import pytest

from magcache_framepack.app.grid import GRID_OUTPUTS
from magcache_framepack.grid import (MAX_CELLS, GridCell, GridRow, cell_settings, grid_cells, parse_values,
                                     rows_csv, rows_json)
from magcache_framepack.records import decode_frames
from magcache_framepack.settings import JobSettings
from test_app import ONE_SECTION, Server


def test_values_are_read_as_typed_and_checked_against_the_limits() -> None:
    assert parse_values("0.06, 0.1 0.15,0.1", "magcache_thresh") == [0.06, 0.1, 0.15]
    assert parse_values("2, 3.0", "magcache_K") == [2, 3]
    assert parse_values("", "retention_ratio") == []
    with pytest.raises(ValueError, match=r"magcache_K 2.5: must be an integer from 1 to 10"):
        parse_values("2.5", "magcache_K")
    with pytest.raises(ValueError, match=r"magcache_thresh 1.5: must be a number from 0 to 1"):
        parse_values("0.1, 1.5", "magcache_thresh")
    with pytest.raises(ValueError, match=r"'x' is not a number"):
        parse_values("0.1, x", "magcache_thresh")


def test_cells_are_every_combination_threshold_first() -> None:
    cells = grid_cells([0.1, 0.2], [2, 3], [0.2])
    assert [(c.thresh, c.k, c.retention) for c in cells] == [(0.1, 2, 0.2), (0.1, 3, 0.2), (0.2, 2, 0.2),
                                                              (0.2, 3, 0.2)]
    assert cells[1].name == "E0.1 K3 R0.2"
    with pytest.raises(ValueError, match="at least one threshold"):
        grid_cells([0.1], [], [0.2])
    with pytest.raises(ValueError, match=f"at most {MAX_CELLS}"):
        grid_cells([i / 100 for i in range(10)], [1, 2, 3, 4], [0.1])


def test_a_cell_is_the_base_job_with_its_cache_setting() -> None:
    base = JobSettings(prompt="p", seed=3, steps=12, cache="teacache", calibrate=True, magcache_thresh=0.5)
    cell = cell_settings(base, GridCell(0.2, 4, 0.3))
    assert (cell.cache, cell.calibrate, cell.magcache_thresh, cell.magcache_K, cell.retention_ratio) == \
        ("magcache", False, 0.2, 4, 0.3)
    assert (cell.prompt, cell.seed, cell.steps) == ("p", 3, 12)
    reference = cell_settings(base, None)
    assert reference.cache == "off" and not reference.calibrate and reference.seed == 3


def test_exports_hold_every_row() -> None:
    rows = [GridRow("E0.1 K2 R0.2", 0.1, 2, 0.2, "done", video="a.mp4", seconds=1.5, psnr_mean=math.inf,
                    ssim_mean=1.0, wall_speedup=1.25),
            GridRow("E0.2 K2 R0.2", 0.2, 2, 0.2, "stopped", message="End was pressed")]
    table = list(csv.DictReader(io.StringIO(rows_csv(rows))))
    assert [r["setting"] for r in table] == ["E0.1 K2 R0.2", "E0.2 K2 R0.2"]
    assert table[0]["psnr_mean"] == "inf" and float(table[0]["wall_speedup"]) == 1.25
    assert table[1]["status"] == "stopped" and table[1]["video"] == ""
    assert set(table[0]) == {f.name for f in dataclasses.fields(GridRow)}
    data = json.loads(rows_json(rows, {"video": "ref.mp4"}))
    assert data["reference"] == {"video": "ref.mp4"} and data["cells"][1]["message"] == "End was pressed"


# -- the Grid tab's endpoint, on a tiny app -----------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = Server("framepack", tmp_path_factory.mktemp("grid"))
    yield server
    server.demo.close()


JOB = {k: v for k, v in ONE_SECTION.items() if k not in ("magcache_thresh", "magcache_K", "retention_ratio")}


def grid(server: Server, client: Any = None, **values: Any) -> Any:
    from gradio_client import handle_file

    return (client or server.client()).submit(input_image=handle_file(str(server.image)), prompt="a cat walks",
                                              seed=9, api_name="/grid", **JOB, **values)


@pytest.mark.slow
def test_grid_cells_equal_single_runs(server: Server) -> None:
    result = dict(zip(GRID_OUTPUTS, grid(server, thresholds="0.1, 0.3", ks="1, 4").result(), strict=True))
    assert result["status"].startswith("**Grid:** Done: 4 cells"), result["status"]
    exported = json.loads(pathlib.Path(result["json"]).read_text(encoding="utf-8"))
    cells = exported["cells"]
    assert [(c["thresh"], c["k"]) for c in cells] == [(0.1, 1), (0.1, 4), (0.3, 1), (0.3, 4)]
    assert len(list(csv.DictReader(open(result["csv"], encoding="utf-8")))) == 4
    off = server.generate(seed=9, cache="off", **JOB)
    np.testing.assert_array_equal(decode_frames(exported["reference"]["video"]), decode_frames(off["video_file"]))
    for cell in cells:
        assert cell["status"] == "done", cell
        single = server.generate(seed=9, cache="magcache", magcache_thresh=cell["thresh"], magcache_K=cell["k"],
                                 retention_ratio=cell["retention"], **JOB)
        np.testing.assert_array_equal(decode_frames(cell["video"]), decode_frames(single["video_file"]))
        assert cell["computed_steps"] == len(single["report"]["plan"]["computed_steps"])
    assert result["table"]["data"][0][0] == "E0.1 K1 R0.2" and len(result["table"]["data"]) == 4
    assert result["scatter"].count("<circle") == 8        # every cell in both scatters


def test_grid_refuses_bad_values_in_one_line(server: Server) -> None:
    result = dict(zip(GRID_OUTPUTS, grid(server, thresholds="0.1", ks="0").result(), strict=True))
    assert result["status"] == "**Grid:** Cannot start the grid: magcache_K 0: must be an integer from 1 to 10 " \
                               "(3 or 4 are the published values)"


@pytest.mark.slow
def test_end_stops_the_grid_and_keeps_the_cells_that_ran(server: Server) -> None:
    client = server.client()
    job = grid(server, client, thresholds="0.1, 0.2, 0.3", ks="1, 2, 3, 4")
    deadline = time.monotonic() + 120
    while not any("1 of 12 cells" in str(out[0]) for out in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), "the grid should report its first cell"
        time.sleep(0.1)
    assert client.predict(api_name="/end") is True
    result = dict(zip(GRID_OUTPUTS, job.result(), strict=True))
    assert result["status"].startswith("**Grid:** Stopped:"), result["status"]
    cells = json.loads(pathlib.Path(result["json"]).read_text(encoding="utf-8"))["cells"]
    assert 1 <= len(cells) < 12
    assert all(c["status"] in ("done", "stopped") for c in cells)
