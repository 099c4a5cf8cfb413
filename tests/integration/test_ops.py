"""What IT staff rely on: systemd readiness and watchdog pings, Prometheus metrics, graceful stop."""

from __future__ import annotations

import os
import socket
import urllib.request

from tests.waiting import eventually

from .conftest import drop, free_port, png_bytes


def test_systemd_ready_and_watchdog_notifications(make_daemon, tmp_path, monkeypatch) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    d = make_daemon()
    d.start()
    messages: list[str] = []

    def pinged() -> bool:  # recv blocks until the next notification
        messages.append(sock.recv(4096).decode())
        return any("WATCHDOG=1" in m for m in messages)

    eventually(pinged, "a WATCHDOG=1 notification", timeout=20, every=0)
    assert any(m.startswith("READY=1") for m in messages), messages
    assert any("WATCHDOG=1" in m for m in messages), messages
    assert d.stop() == 0
    sock.settimeout(1)
    rest = []
    try:
        while True:
            rest.append(sock.recv(4096).decode())
    except TimeoutError:
        pass
    assert any("STOPPING=1" in m for m in rest), rest
    sock.close()
    assert "stopped" in d.log()


def test_prometheus_metrics_count_results_by_outcome(make_daemon) -> None:
    port = free_port()
    d = make_daemon(server={"metrics_port": port})
    d.start()
    drop(d.incoming, "ok.png", png_bytes(1))
    drop(d.incoming, "empty.png", b"")
    d.collect(2)
    # The counters move just after the results are committed (and may be streamed): read until they have.
    text = eventually(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode(),
        "both results' latencies counted",
        until=lambda text: "appliance_result_latency_seconds_count 2.0" in text,
        timeout=10,
    )
    assert 'appliance_results_total{code="",outcome="scored"} 1.0' in text
    assert 'appliance_results_total{code="empty_file",outcome="rejected"} 1.0' in text
    assert "appliance_ready 1.0" in text
    assert "appliance_result_latency_seconds_count 2.0" in text


def test_sigterm_finishes_in_flight_work(make_daemon) -> None:
    d = make_daemon(inference={"decode_workers": 1})
    d.start()
    for n in range(10):
        drop(d.incoming, f"f{n}.png", png_bytes(50 + n, size=512))
    d.collect(1)
    assert d.stop() == 0
    # Whatever was not finished stays journaled and is done at the next start; nothing is lost.
    d.start()
    results = d.collect(10)
    assert sorted(r.file_name for r in results) == [f"f{n}.png" for n in range(10)]
    eventually(
        lambda: [p for p in os.listdir(d.incoming) if not p.startswith(".")],
        "the watch folder emptied",
        until=lambda left: not left,
        timeout=10,
    )
    assert not [p for p in os.listdir(d.incoming) if not p.startswith(".")]
