"""Terminal tokens and the clinic's certificates, in-process."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.api.certs import make_server, make_terminal
from appliance.api.client import Connection
from appliance.api.tls import check_exposure
from appliance.api.tokens import Scope, TokenStore
from appliance.config import ServerConfig, is_loopback
from appliance.domain.errors import ConfigError


def test_a_token_is_shown_once_kept_as_a_hash_and_revoked_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = TokenStore(path)
    daemon_view = TokenStore(path)  # the daemon's own instance, reading the same file
    token = store.add("ward-1", Scope.score)
    assert token.startswith("apl_") and token not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = daemon_view.lookup(token)
    assert record is not None and record.name == "ward-1" and record.level == Scope.score
    assert daemon_view.lookup(token + "x") is None
    with pytest.raises(ConfigError, match="has a token already"):
        store.add("ward-1", Scope.read)
    store.revoke("ward-1")
    revoked = daemon_view.lookup(token)
    assert revoked is not None and revoked.revoked_unix is not None
    assert not daemon_view.active()
    fresh = store.add("ward-1", Scope.read)  # a new token after the revocation
    assert daemon_view.lookup(fresh) is not None and len(daemon_view.active()) == 1
    with pytest.raises(ConfigError, match="letters, digits"):
        store.add("ward 1\n", Scope.read)


def test_certificates_name_the_box_and_the_terminal_and_keys_are_private(tmp_path: Path) -> None:
    make_server(tmp_path, ["appliance.clinic", "localhost"], ["10.1.2.3", "127.0.0.1"])
    folder = make_terminal(tmp_path, "ward-7")
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["appliance.clinic", "localhost"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    terminal = x509.load_pem_x509_certificate((folder / "ward-7.crt").read_bytes())
    assert terminal.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ward-7"
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    terminal.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)
    for key in (tmp_path / "ca" / "ca.key", tmp_path / "server.key", folder / "ward-7.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700


def test_the_network_needs_tls_and_tokens_unless_a_lab_says_insecure(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    tokens = TokenStore(tmp_path / "tokens.json")
    check_exposure(ServerConfig(host="127.0.0.1"), tokens)  # loopback: nothing needed
    with pytest.raises(ConfigError, match="serves only TLS"):
        check_exposure(ServerConfig(host="0.0.0.0"), tokens)
    tls = ServerConfig(host="0.0.0.0", tls_cert=tmp_path / "c", tls_key=tmp_path / "k", tokens_file=tokens.path)
    with pytest.raises(ConfigError, match="appliance token add"):
        check_exposure(tls, tokens)
    tokens.add("ward-1", Scope.read)
    check_exposure(tls, tokens)
    check_exposure(ServerConfig(host="0.0.0.0", insecure=True), tokens)
    with pytest.raises(ConfigError, match="would let anyone in"):
        check_exposure(tls.model_copy(update={"require_token": False}), tokens)
    assert not ServerConfig(host="0.0.0.0", insecure=True).tokens_required


def test_the_client_never_sends_a_token_in_the_clear_to_another_machine() -> None:
    with pytest.raises(OSError, match="in the clear"):
        Connection("10.0.0.5:50051", token="apl_x").channel()
    Connection("127.0.0.1:50051", token="apl_x").channel().close()  # loopback: no one else can read it


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives a file to another user (run the tests as root)")
def test_a_renewed_key_keeps_the_owner_the_admin_gave_it(tmp_path: Path) -> None:
    make_server(tmp_path, ["appliance.clinic"], [])
    key = tmp_path / "server.key"
    os.chown(key, 4321, 4321)  # as `chown appliance server.key` gives it to the daemon's user
    make_server(tmp_path, ["appliance.clinic"], [])  # the renewal, by root
    st = key.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 4321, 0o600)
