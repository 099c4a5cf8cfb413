"""grpc core's lines for refused TLS handshakes, as grpcio 1.85.1 prints them, read into words for IT."""

from __future__ import annotations

import pytest

from appliance.api.core_log import handshake_reason

PREFIX = "I1206 02:40:55.519588    7693 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: "


@pytest.mark.parametrize(
    ("said", "words"),
    [
        (
            "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer "
            "certificate",
            "the clinic's CA did not sign",
        ),
        ("error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired", "expired"),
        (
            "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate is not yet valid",
            "not valid yet",
        ),
        (
            "error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate "
            "verification context",
            "no client certificate",
        ),
        (
            "error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification "
            "context",
            "not TLS",
        ),
        ("error:10000412:SSL routines:OPENSSL_internal:SSLV3_ALERT_BAD_CERTIFICATE\x1b[2J<forged>", "TLS error "),
    ],
)
def test_each_refused_handshake_is_told_in_words(said: str, words: str) -> None:
    reason = handshake_reason(PREFIX + said)
    assert reason is not None and words in reason
    assert "\x1b" not in reason and "<" not in reason  # only the library's words, nothing a peer could shape


def test_other_lines_are_not_handshakes() -> None:
    assert handshake_reason("E1206 02:40:55.519588 7693 chttp2_server.cc:1] some other error") is None
    assert handshake_reason("Traceback (most recent call last):") is None
