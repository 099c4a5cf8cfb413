"""Who can reach the server, decided before it listens: TLS credentials, and the rule that a server the
clinic's network can reach serves only TLS and only to terminals with tokens."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from appliance.api.tokens import TokenStore
from appliance.config import ServerConfig
from appliance.domain.errors import ConfigError

log = logging.getLogger(__name__)


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"server.{key}: cannot read {path} ({e.strerror}).") from e


def credentials(server: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config, or None for plaintext."""
    if server.tls_cert is None and server.tls_key is None:
        if server.tls_client_ca is not None:
            raise ConfigError("server.tls_client_ca needs server.tls_cert and server.tls_key too.")
        return None
    if server.tls_cert is None or server.tls_key is None:
        raise ConfigError("Set both server.tls_cert and server.tls_key (`make certs` makes them), or neither.")
    cert = _read(server.tls_cert, "tls_cert")
    key = _read(server.tls_key, "tls_key")
    if server.tls_key.stat().st_mode & 0o077:
        raise ConfigError(f"server.tls_key: {server.tls_key} is readable by other users; chmod 600 it.")
    client_ca = _read(server.tls_client_ca, "tls_client_ca") if server.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca))


INSECURE_PROBLEM = (
    "server.insecure = true: serving the network in plaintext without terminal tokens; anyone on it can read "
    "results and submit images (a lab only, never a clinic)."
)


def insecure_exposure(server: ServerConfig) -> bool:
    """Whether the server is open to the network in plaintext without tokens (a lab's `insecure = true`)."""
    return server.insecure and not server.loopback_only


def check_exposure(server: ServerConfig, tokens: TokenStore) -> None:
    """Refuse to serve the network in the clear or without tokens, unless a lab said so out loud."""
    if server.loopback_only:
        return
    if server.insecure:
        log.error(
            "INSECURE: serving %s in plaintext without terminal tokens (server.insecure = true); anyone on the "
            "network can read results and submit images. Never run a clinic's appliance like this.",
            server.host,
        )
        return
    if server.tls_cert is None:
        raise ConfigError(
            f"server.host = {server.host!r} is reachable from the network, so the appliance serves only TLS: set "
            "server.tls_cert and server.tls_key (`make certs` makes them), or listen on 127.0.0.1."
        )
    if not server.tokens_required:
        raise ConfigError(
            f"server.require_token = false on server.host = {server.host!r}, which the network can reach, would "
            "let anyone in: remove it (or set server.insecure = true, for a lab only)."
        )
    if not tokens.active():
        raise ConfigError(
            f"server.host = {server.host!r} is reachable from the network and no terminal token exists yet: "
            "run `appliance token add NAME --scope read` for each terminal (tokens live in "
            f"{server.tokens_file})."
        )
