"""TLS and terminal tokens, against the real daemon: who gets in, who is refused, and what each is told."""

from __future__ import annotations

import datetime
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from appliance.api.certs import make_ca, make_server, make_terminal
from appliance.api.client import Connection, explain
from appliance.api.tokens import Scope, TokenStore
from appliance.v1 import scoring_pb2 as pb
from appliance.v1 import scoring_pb2_grpc as pb_grpc
from tests.integration.conftest import TEST_MODEL, Daemon, free_port, png_bytes
from tests.integration.test_reload import wait_for_log

SCORING = "appliance.v1.Scoring"


class Clinic:
    """A daemon on loopback that asks what a networked one asks: mutual TLS and a token on every call."""

    def __init__(self, root: Path) -> None:
        self.certs = root / "certs"
        make_server(self.certs, ["localhost"], ["127.0.0.1"])
        for name in ("ward-1", "ward-2", "it-admin"):
            make_terminal(self.certs, name)
        make_terminal(root / "other-clinic", "ward-1")  # the same name, signed by another CA
        self.tokens = TokenStore(root / "data" / "tokens.json")
        self.token = {
            "ward-1": self.tokens.add("ward-1", Scope.read),
            "ward-2": self.tokens.add("ward-2", Scope.score),
            "it-admin": self.tokens.add("it-admin", Scope.admin),
        }
        self.daemon = Daemon(
            root=root,
            model=TEST_MODEL,
            overrides={
                "server": {
                    "tls_cert": self.certs / "server.crt",
                    "tls_key": self.certs / "server.key",
                    "tls_client_ca": self.certs / "ca.crt",
                    "require_token": True,
                }
            },
        )
        self.daemon.credentials = self.credentials("it-admin")

    def credentials(self, name: str, token: str | None = None, certs: Path | None = None) -> dict[str, object]:
        folder = (certs or self.certs) / "terminals" / name
        return {
            "ca": self.certs / "ca.crt",
            "cert": folder / f"{name}.crt",
            "key": folder / f"{name}.key",
            "token": token if token is not None else self.token[name],
        }

    def connect(self, **credentials: object) -> grpc.Channel:
        return Connection(self.daemon.target, **credentials).channel()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clinic]:
    c = Clinic(tmp_path_factory.mktemp("clinic"))
    c.daemon.start()
    yield c
    c.daemon.stop()


def _status(channel: grpc.Channel) -> pb.Status:
    with channel:
        return pb_grpc.ScoringStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)


def _refusal(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    return e.value


def test_a_terminal_with_its_certificate_and_token_streams_and_scores(clinic: Clinic) -> None:
    assert _status(clinic.connect(**clinic.credentials("ward-1"))).ready
    with clinic.connect(**clinic.credentials("ward-2")) as ch:
        r = pb_grpc.ScoringStub(ch).Score(pb.ScoreRequest(image=png_bytes(7001), file_name="a.png"), timeout=60)
    assert r.outcome == pb.OUTCOME_SCORED
    with clinic.connect(**clinic.credentials("ward-1")) as ch:
        stream = pb_grpc.ScoringStub(ch).StreamResults(pb.StreamResultsRequest(since_sequence=r.sequence - 1))
        assert next(iter(stream)).sequence == r.sequence
        stream.cancel()


def test_health_answers_without_a_token_and_reflection_needs_one(clinic: Clinic) -> None:
    anonymous = clinic.credentials("ward-1", token="")
    with clinic.connect(**anonymous) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SCORING), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        e = _refusal(lambda: list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([request]))))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    with clinic.connect(**clinic.credentials("ward-1")) as ch:
        answers = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([request]), timeout=10))
    assert SCORING in [s.name for s in answers[0].list_services_response.service]


def test_no_token_bad_token_and_revoked_token_are_unauthenticated(clinic: Clinic, tmp_path: Path) -> None:
    for token, words in (("", "needs a terminal token"), ("apl_not-a-real-token", "not one this appliance made")):
        channel = clinic.connect(**clinic.credentials("ward-1", token=token))
        e = _refusal(lambda ch=channel: _status(ch))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and words in (e.details() or "")
        # A streaming method is refused with a streaming answer (no grpcio shape error).
        with clinic.connect(**clinic.credentials("ward-1", token=token)) as ch:
            e = _refusal(lambda ch=ch: next(iter(pb_grpc.ScoringStub(ch).StreamResults(pb.StreamResultsRequest()))))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED

    # Revoked with the CLI while the daemon runs: refused on the next call, no restart.
    token = clinic.tokens.add("ward-3", Scope.read)
    clinic.tokens.revoke("ward-3")
    make_terminal(clinic.certs, "ward-3")
    e = _refusal(lambda: _status(clinic.connect(**clinic.credentials("ward-3", token=token))))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (e.details() or "")

    token4 = clinic.tokens.add("ward-4", Scope.read)
    make_terminal(clinic.certs, "ward-4")
    assert _status(clinic.connect(**clinic.credentials("ward-4", token=token4))).ready
    config = clinic.daemon.config_path
    out = subprocess.run(
        [sys.executable, "-m", "appliance.app.cli", "token", "revoke", "ward-4", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "revoked" in out.stdout
    e = _refusal(lambda: _status(clinic.connect(**clinic.credentials("ward-4", token=token4))))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (e.details() or "")
    log = clinic.daemon.log()
    assert "refused /appliance.v1.Scoring/GetStatus" in log and "revoked token of 'ward-4'" in log
    assert token4 not in log and "apl_not-a-real-token" not in log


def test_an_under_scoped_token_is_permission_denied(clinic: Clinic) -> None:
    with clinic.connect(**clinic.credentials("ward-1")) as ch:
        stub = pb_grpc.ScoringStub(ch)
        e = _refusal(lambda: stub.Score(pb.ScoreRequest(image=png_bytes(7002)), timeout=10))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "needs a score token" in (e.details() or "")
        e = _refusal(lambda: stub.ReloadModel(pb.ReloadModelRequest(), timeout=10))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "needs an admin token" in (e.details() or "")


def test_a_token_is_bound_to_its_terminals_certificate(clinic: Clinic) -> None:
    stolen = clinic.credentials("ward-2", token=clinic.token["ward-1"])
    e = _refusal(lambda: _status(clinic.connect(**stolen)))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "another terminal's certificate" in (e.details() or "")


def test_handshake_failures_are_told_plainly(clinic: Clinic, tmp_path: Path) -> None:
    # The terminal trusts another clinic's CA: it cannot verify the appliance.
    wrong_ca = clinic.credentials("ward-1") | {"ca": clinic.daemon.root / "other-clinic" / "ca.crt"}
    e = _refusal(lambda: _status(clinic.connect(**wrong_ca)))
    assert e.code() == grpc.StatusCode.UNAVAILABLE and "not signed by the CA" in explain(e)
    # A certificate from another CA, and none at all: the appliance refuses the handshake.
    foreign = clinic.credentials("ward-1", certs=clinic.daemon.root / "other-clinic")
    for creds in (foreign, clinic.credentials("ward-1") | {"cert": None, "key": None}):
        e = _refusal(lambda creds=creds: _status(clinic.connect(**creds)))
        assert e.code() == grpc.StatusCode.UNAVAILABLE
    # Plaintext against the TLS port.
    e = _refusal(lambda: _status(Connection(clinic.daemon.target, token=clinic.token["ward-1"]).channel()))
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert "pass --ca" in explain(e)


def _terminal_valid(clinic: Clinic, name: str, start: datetime.datetime, end: datetime.datetime) -> dict[str, object]:
    """A terminal's certificate from the clinic's CA, valid from ``start`` to ``end`` only."""
    ca_key, ca_cert = make_ca(clinic.certs)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = clinic.daemon.root / "dated" / name
    folder.mkdir(parents=True)
    (folder / "t.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "t.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return clinic.credentials("ward-1") | {"cert": folder / "t.crt", "key": folder / "t.key"}


def test_refused_tls_handshakes_are_logged_in_words_once_per_kind(tmp_path: Path) -> None:
    """grpc core says a refused handshake only on stderr; the daemon turns it into one throttled line a kind
    (its own daemon: the module's has refused handshakes in its throttle's minute already)."""
    clinic = Clinic(tmp_path)
    clinic.daemon.start()
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    kinds = {
        "a client certificate the clinic's CA did not sign": clinic.credentials(
            "ward-1", certs=clinic.daemon.root / "other-clinic"
        ),
        "an expired client certificate": _terminal_valid(clinic, "expired", now - 10 * day, now - day),
        "a client certificate not valid yet": _terminal_valid(clinic, "future", now + day, now + 10 * day),
        "no client certificate": clinic.credentials("ward-1") | {"cert": None, "key": None},
        "not TLS": {"token": clinic.token["ward-1"]},
    }
    for words, creds in kinds.items():
        for _ in range(3):  # the first is logged, the rest are counted
            e = _refusal(lambda creds=creds: _status(clinic.connect(**creds)))
            assert e.code() == grpc.StatusCode.UNAVAILABLE
        wait_for_log(clinic.daemon, f"refused a TLS handshake: {words}", timeout=30)
    assert clinic.daemon.stop() == 0
    lines = clinic.daemon.log().splitlines()
    for words in kinds:
        assert len([x for x in lines if f"refused a TLS handshake: {words}" in x]) == 1, words
    assert not [x for x in lines if "Handshake failed" in x]  # grpc core's own line is not passed on as well


def test_the_client_takes_credentials_from_flags_and_says_what_is_wrong(clinic: Clinic) -> None:
    creds = clinic.credentials("ward-1")
    base = [sys.executable, "-m", "appliance.api.client", "--target", clinic.daemon.target]
    flags = ["--ca", str(creds["ca"]), "--cert", str(creds["cert"]), "--key", str(creds["key"])]
    ok = subprocess.run(
        [*base, *flags, "--token", str(creds["token"]), "status"], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert '"ready": true' in ok.stdout
    bad = subprocess.run([*base, *flags, "--token", "apl_wrong", "status"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "refused: The token is not one this appliance made" in bad.stderr


@pytest.mark.parametrize(
    ("server", "words"),
    [
        ({"host": "0.0.0.0"}, "serves only TLS"),
        ({"host": "0.0.0.0", "tls_cert": "certs/server.crt", "tls_key": "certs/server.key"}, "appliance token add"),
    ],
)
def test_a_network_facing_daemon_refuses_to_start_without_tls_and_tokens(
    tmp_path: Path, server: dict[str, object], words: str
) -> None:
    make_server(tmp_path / "certs", ["localhost"], ["127.0.0.1"])
    daemon = Daemon(root=tmp_path, model=TEST_MODEL, overrides={"server": server | {"port": free_port()}})
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=120) == 2
    log = daemon.log()
    assert words in log and "Traceback" not in log


def _peak_rss_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_a_caller_without_a_token_is_refused_before_its_image_is_read(clinic: Clinic) -> None:
    """Sixteen 60 MB Score calls with no token: refused as they arrive, so the daemon never holds them
    (it used to read each whole request first: about 1.1 GB more at the peak)."""
    assert clinic.daemon.proc is not None
    pid = clinic.daemon.proc.pid
    before = _peak_rss_mb(pid)
    image = bytes(60 * 1024 * 1024)

    def call(_: int) -> grpc.StatusCode:
        with clinic.connect(**clinic.credentials("ward-2", token="")) as ch:
            try:
                pb_grpc.ScoringStub(ch).Score(pb.ScoreRequest(image=image), timeout=60)
            except grpc.RpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(16) as pool:
        codes = set(pool.map(call, range(16)))
    assert codes == {grpc.StatusCode.UNAUTHENTICATED}
    assert _peak_rss_mb(pid) - before < 200


def test_a_flood_of_refused_calls_is_one_line_not_one_each(make_daemon: type[Daemon]) -> None:
    """Refusals are throttled: the first at once, the rest counted (a line a minute), so a caller repeating
    a refused call cannot push real errors past journald's rate limit."""
    daemon = make_daemon(server={"require_token": True})
    daemon.start(wait=False)
    daemon.wait_ready()
    with grpc.insecure_channel(daemon.target) as ch:
        stub = pb_grpc.ScoringStub(ch)
        for _ in range(600):
            e = _refusal(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=10))
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert daemon.stop() == 0
    log = daemon.log()
    assert log.count("refused /appliance.v1.Scoring/GetStatus: no token") == 1


def test_an_insecure_lab_box_says_so_in_health_status_and_metrics(make_daemon: type[Daemon]) -> None:
    """server.insecure = true: the box serves (health SERVING), and every place a probe, a terminal or a
    graph reads says it is open; metrics on the network warn at start."""
    metrics_port = free_port()
    daemon = make_daemon(
        server={"host": "0.0.0.0", "insecure": True, "metrics_host": "0.0.0.0", "metrics_port": metrics_port}
    )
    daemon.start()
    with daemon.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch)
        overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        secure = health.Check(health_pb2.HealthCheckRequest(service="appliance.secure"), timeout=10)
        status = pb_grpc.ScoringStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10)
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert secure.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert [p for p in status.problems if "server.insecure = true" in p]
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert "appliance_insecure 1.0" in text.splitlines()
    log = daemon.log()
    assert "INSECURE: serving 0.0.0.0 in plaintext" in log
    assert f"metrics on 0.0.0.0:{metrics_port} answer anyone who can reach the port" in log


def test_a_clinic_box_is_secure_in_health_and_metrics(clinic: Clinic) -> None:
    with clinic.connect(**clinic.credentials("ward-1", token="")) as ch:
        secure = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="appliance.secure"), timeout=10
        )
    assert secure.status == health_pb2.HealthCheckResponse.SERVING
    assert not [p for p in _status(clinic.connect(**clinic.credentials("ward-1"))).problems if "insecure" in p]
