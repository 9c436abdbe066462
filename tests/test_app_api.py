"""The app's /generate API on a real server over loopback: values moved into range as the page moves them,
refusals that say why in one log line, and the next request served (issue 15, items 3 and 10).

Run on both dependency sets: Gradio 6's sliders refuse an out-of-range number before the event
function runs, Gradio 5.23's pass it on; the app must behave the same on both.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import test_app
from magcache_framepack.app import GENERATE_OUTPUTS, main
from magcache_framepack.app.handlers import END_REPLY_SECONDS
from magcache_framepack.app.jobs import JobStream, StepClock
from magcache_framepack.app.serve import build_parser
from test_app import ONE_SECTION, Server, wait_for

fake_main = test_app.fake_main          # the fixture: main() with loading, building and serving recorded

LOGGER = "magcache_framepack.app"          # the app's loggers: handlers (a job refused) and requests (Gradio's refusals)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = Server("framepack", tmp_path_factory.mktemp("api"))
    yield started
    started.demo.close()


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The server's log lines for refused requests (the app's own words for them)."""
    return [r.getMessage() for r in caplog.records
            if r.name.startswith(LOGGER) and r.getMessage().startswith(("Cannot start:", "Refused a request"))]


def queue_call(server: Server, data: list[Any]) -> dict[str, Any]:
    """/generate as a browser calls it (queue/join, then the event stream): the final message's output.

    gradio_client uploads every file it is given, so a path the client never uploaded takes raw HTTP.
    """
    import httpx

    base = server.url.rstrip("/")
    fn_index = next(i for i, fn in server.demo.fns.items() if fn.api_name == "generate")
    session = uuid.uuid4().hex
    httpx.post(f"{base}/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                       "event_data": None, "trigger_id": None}).raise_for_status()
    with httpx.stream("GET", f"{base}/gradio_api/queue/data", params={"session_hash": session}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the event stream ended without a completed message")


@pytest.mark.slow
def test_out_of_range_numbers_run_moved_into_range_and_the_report_says_so(
        server: Server, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    capfd.readouterr()
    out = server.generate(**{**ONE_SECTION, "steps": 0, "magcache_thresh": 5, "magcache_K": 0,
                             "retention_ratio": 2, "mp4_crf": 99})
    report = out["report"]
    assert report["status"] == "done", report["message"]
    # the limits as the README states them: steps 1-100, threshold 0-1, K 1-10, retention 0-0.99, CRF 0-51
    assert {name: report["settings"][name] for name in ("steps", "magcache_thresh", "magcache_K",
                                                         "retention_ratio", "crf")} == \
        {"steps": 1, "magcache_thresh": 1.0, "magcache_K": 1, "retention_ratio": 0.99, "crf": 51}
    assert report["moved_into_range"] == {
        "steps": {"given": 0, "used": 1}, "magcache_thresh": {"given": 5, "used": 1.0},
        "magcache_K": {"given": 0, "used": 1}, "retention_ratio": {"given": 2, "used": 0.99},
        "crf": {"given": 99, "used": 51}}
    record = json.loads(pathlib.Path(report["video"]).with_suffix(".json").read_text(encoding="utf-8"))
    assert record["settings"]["steps"] == 1 and len(report["sections"][0]["computed_steps"]) == 1   # what ran
    # in range: nothing moved
    plain = server.generate(**ONE_SECTION)["report"]
    assert plain["status"] == "done" and plain["moved_into_range"] == {}

    # 200 steps run as 100: the report says so from the first update on (the job is then ended)
    client = server.client()
    from gradio_client import handle_file

    job = client.submit(input_image=handle_file(str(server.image)), prompt="too many steps", steps=200,
                        total_second_length=1, latent_window_size=6, api_name="/generate")
    wait_for(lambda: len(job.outputs()) >= 1, 60, "the job's first update")
    first = dict(zip(GENERATE_OUTPUTS, job.outputs()[0], strict=True))["report"]
    assert first["settings"]["steps"] == 100 and first["moved_into_range"] == {"steps": {"given": 200, "used": 100}}
    wait_for(lambda: client.predict(api_name="/end") or job.done(), 60, "the job to stop")
    assert dict(zip(GENERATE_OUTPUTS, job.result(timeout=120), strict=True))["report"]["status"] in ("stopped", "done")
    assert "Traceback" not in capfd.readouterr().err
    assert refusal_lines(caplog) == []
    moved = [r.getMessage() for r in caplog.records if "moved into range" in r.getMessage()]
    assert moved[0] == ("job values moved into range: steps 0 -> 1, magcache_thresh 5 -> 1.0, magcache_K 0 -> 1, "
                        "retention_ratio 2 -> 0.99, crf 99 -> 51")


@pytest.mark.slow
def test_every_refusal_says_why_in_one_log_line_and_the_next_request_runs(
        server: Server, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture) -> None:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    caplog.set_level(logging.INFO, logger=LOGGER)
    capfd.readouterr()
    refused = {     # input -> what the message must say (the input's name and what it accepts)
        "steps": ("abc", "steps = 'abc': must be an integer from 1 to 100"),
        "seed": (-1, "seed = -1: must be an integer from 0 to 9223372036854775807"),
        "total_second_length": ("long", "total_second_length = 'long': must be a number from 1 to 120"),
        "cache": ("bogus", "cache = 'bogus': must be one of magcache, teacache, off"),
        "calibrate": ("maybe", "calibrate = 'maybe': must be true or false"),
        "mag_ratios": ("/etc/passwd", "unknown calibration profile '/etc/passwd'"),
    }
    for name, (value, reason) in refused.items():
        report = server.generate(**{name: value})["report"]
        assert report["status"] == "error" and reason in report["message"], (name, report["message"])
    a_text_file = server.image.with_name("notes.png")
    a_text_file.write_text("not a picture", encoding="utf-8")
    client = server.client()
    report = dict(zip(GENERATE_OUTPUTS, client.predict(input_image=handle_file(str(a_text_file)), prompt="x",
                                                       api_name="/generate"), strict=True))["report"]
    assert "notes.png is not a readable image" in report["message"]

    # an image that is not an upload: Gradio refuses it before the job; the client still gets the reason
    with pytest.raises(AppError, match="send a file as an upload"):
        client.predict(input_image="/etc/passwd", prompt="x", api_name="/generate")
    not_uploaded = queue_call(server, [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "x", "",
                                       1, 1, 6, 4, 1, 10, 0, 6, "magcache", 0.1, 3, 0.2, "library", False, 16,
                                       "magnitude", None, None])     # ..., resample, target_speedup, session
    assert not_uploaded["success"] is False
    assert "/etc/passwd" in not_uploaded["output"]["error"] and "not uploaded" in not_uploaded["output"]["error"]

    lines = refusal_lines(caplog)
    assert len(lines) == len(refused) + 3, lines                  # one line per refusal
    assert any("/etc/passwd" in line and "not uploaded" in line for line in lines)
    assert "Traceback" not in capfd.readouterr().err
    after = server.generate(**ONE_SECTION)["report"]               # and the server still serves
    assert after["status"] == "done", after["message"]


def test_a_retry_event_starts_the_page_over_and_says_why() -> None:
    """A Ray job that runs again (runners.ray.AppRunner posts ("retry", text)) shows no sections of the lost try."""
    from types import SimpleNamespace

    stream = JobStream(StepClock([False] * 4, 2, 0.0))
    lost_section = SimpleNamespace(seconds=1.0, sampling_seconds=0.5, video_path="lost.mp4",
                                   summary=lambda: "Section 1/2: computed 4/4 steps")
    stream.take([("section", lost_section)])
    assert stream.sections and stream.video == "lost.mp4"
    stream.shown()
    stream.take([("retry", "The Ray worker running this job was lost (X); running it again")])
    assert stream.sections == [] and stream.video is None
    assert stream.lines == ["The Ray worker running this job was lost (X); running it again"]
    assert "running it again" in stream.bar and stream.urgent       # shown at once, not at the next tick


def test_the_apps_max_retries_reach_its_ray_pool(fake_main: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    from magcache_framepack.runners import ray as ray_runners

    pools: list[tuple[Any, ...]] = []
    monkeypatch.setattr(ray_runners, "require_ray", lambda: None)
    monkeypatch.setattr(ray_runners, "start_app_runner", lambda *args: pools.append(args) or "pool")
    outputs = ["--outputs", str(tmp_path / "out"), "--profiles", str(tmp_path / "profiles")]
    main("framepack", ["--tiny", "--ray", *outputs])
    main("f1", ["--tiny", "--ray", "--max-retries", "3", *outputs])
    assert pools == [("local", "framepack", True, None, 1), ("local", "f1", True, None, 3)]   # default 1
    assert fake_main["build"][2]["runner"] == "pool"
    with pytest.raises(SystemExit) as exc:
        main("framepack", ["--tiny", "--ray", "--max-retries", "-1", *outputs])
    assert exc.value.code == 2 and "--max-retries must be 0 or more, got -1" in capsys.readouterr().err
    assert build_parser("framepack").parse_args([]).max_retries == 1


def test_end_reaches_a_client_that_files_its_call_late(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """gradio_client 1.x (Gradio 5's) files a call's id only after the server has answered the call's POST.

    If the reply arrives first, on the stream a running job keeps open, that Client's message thread
    dies (a KeyError) and all its calls are cancelled.  /end replies after END_REPLY_SECONDS, so a
    Client held up for less than that (here half of it, as on a busy machine) still gets its reply.
    """
    from gradio_client import Client, handle_file

    send_data = Client.send_data

    def slow_send_data(self: Any, *args: Any, **kwargs: Any) -> Any:
        event_id = send_data(self, *args, **kwargs)
        time.sleep(END_REPLY_SECONDS / 2)
        return event_id

    monkeypatch.setattr(Client, "send_data", slow_send_data)
    client = server.client()
    job = client.submit(input_image=handle_file(str(server.image)), prompt="ended", steps=100,
                        total_second_length=1, latent_window_size=6, api_name="/generate")
    wait_for(lambda: len(job.outputs()) >= 1, 60, "the job's first update")
    assert client.submit(api_name="/end").result(timeout=60) is True       # (1.x: otherwise it waits forever)
    assert dict(zip(GENERATE_OUTPUTS, job.result(timeout=120), strict=True))["report"]["status"] == "stopped"
