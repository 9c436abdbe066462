"""A local Ray, started as ``--ray`` starts it (runners.ray.start_local), listens on loopback only.

The listening sockets of every process of that Ray session are read with psutil
(the driver, its children, and every process whose command line names the
session's folder: the GCS server, the raylet, the agents, the workers) and each
address must be loopback.  Ray runs here with 2 CPUs and is shut down after; no
other host is contacted.
"""

from __future__ import annotations

import ipaddress
import logging
import os

import psutil
import pytest

ray = pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")

from magcache_framepack.runners import ray as ray_runner
from magcache_framepack.runners.ray import LocalRayRefused, local_ray_refusal, start_local


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (::ffff:127.0.0.1, how Ray's gRPC binds IPv4)."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def session_processes(session_dir: str) -> dict[int, psutil.Process]:
    """This process, its descendants, and every process started for the Ray session in ``session_dir``."""
    me = psutil.Process()
    found = {me.pid: me}
    found.update((p.pid, p) for p in me.children(recursive=True))
    for p in psutil.process_iter(["cmdline"]):
        if any(session_dir in arg for arg in p.info["cmdline"] or ()):
            found[p.pid] = p
    return found


def listening(processes: dict[int, psutil.Process]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of each listening TCP socket of ``processes``."""
    rows = []
    for pid, p in processes.items():
        try:
            name = p.name()
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        rows += [(pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return rows


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only() -> None:
    if ray.is_initialized():
        pytest.skip("a Ray session is already up in this process")
    address = start_local(num_cpus=2, num_gpus=0, logging_level=logging.WARNING)
    try:
        @ray.remote(num_cpus=0)
        class Probe:
            def pid(self) -> int:
                return os.getpid()

        probe = Probe.remote()
        actor_pid = ray.get(probe.pid.remote(), timeout=60)
        session_dir = ray._private.worker._global_node.get_session_dir_path()
        sockets = listening(session_processes(session_dir))
    finally:
        ray.shutdown()
    # the test sees what it must check: the GCS server, the raylet, a worker and the driver each listen
    names = {name for _, name, _, _ in sockets}
    pids = {pid for pid, _, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    assert {os.getpid(), actor_pid} <= pids, sockets
    wide = [s for s in sockets if not is_loopback(s[2])]
    assert not wide, f"listening beyond loopback: {wide}"
    assert is_loopback(address), address


def test_refusal_decision() -> None:
    assert local_ray_refusal("127.0.0.1", token_auth=False) is None
    assert local_ray_refusal("::1", token_auth=False) is None
    assert local_ray_refusal("192.0.2.7", token_auth=True) is None
    line = local_ray_refusal("192.0.2.7", token_auth=False)
    assert "192.0.2.7" in line and "RAY_AUTH_MODE=token" in line and "\n" not in line


def test_refused_before_start_when_loopback_cannot_be_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray that could not be held to loopback, with token authentication turned off, is never started."""
    import contextlib

    if ray.is_initialized():
        pytest.skip("a Ray session is already up in this process")

    @contextlib.contextmanager
    def cannot_pin():
        yield False

    monkeypatch.setattr(ray_runner, "_loopback_node_address", cannot_pin)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(LocalRayRefused, match="beyond loopback"):
        start_local(num_cpus=2, num_gpus=0)
    assert not ray.is_initialized()
