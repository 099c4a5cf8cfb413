"""`make certs`: a clinic's private CA, the appliance's server certificate and one certificate per terminal.

    python -m appliance.api.certs --out certs                 # the CA (first time) and the server certificate
    python -m appliance.api.certs --out certs --terminal ward-3   # a terminal's certificate and key

The CA's key signs every certificate the appliance trusts: keep certs/ca/ off the appliance (or
root-only) once the server and terminal certificates are made. Every key is written 0600.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import os
import socket
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.api.tokens import check_name
from appliance.files.durable import write_atomic

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity browsers and most TLS stacks accept for a leaf


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _replace(path, pem, 0o600)  # never a torn key beside its certificate


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Written whole, keeping a renewed file's owner and group: an admin who gave the key to the daemon's user
    (chown) renews it with `sudo make certs`, and the daemon must still read it."""
    try:
        before = path.stat()
    except FileNotFoundError:
        before = None
    write_atomic(path, data, mode)
    if before is not None and (before.st_uid, before.st_gid) != (os.geteuid(), os.getegid()):
        with contextlib.suppress(PermissionError):  # only root gives a file away
            os.chown(path, before.st_uid, before.st_gid)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Imaging appliance (clinic private CA)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def make_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA in out/ca/, made once and reused after."""
    key_path, cert_path = out / "ca" / "ca.key", out / "ca" / "ca.crt"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key_path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(key_path.parent, 0o700)
    key = _key()
    name = _name(f"Imaging appliance CA {socket.gethostname()}")
    cert = (
        _builder(name, name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    _write_cert(out / "ca.crt", cert)  # the copy terminals and the server need (public)
    return key, cert


def _leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = ca
    key = _key()
    builder = (
        _builder(_name(common_name), ca_cert.subject, key.public_key(), LEAF_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )  # digitalSignature (ECDHE)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def host_names() -> tuple[list[str], list[str]]:
    """This box's DNS names and IP addresses, as terminals may dial it."""
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    addresses = {"127.0.0.1", "::1"}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addresses.add(str(info[4][0]))
    except OSError:
        pass
    # The address of the default route's interface (a UDP connect sends nothing).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            addresses.add(s.getsockname()[0])
        except OSError:
            pass
    return sorted(n for n in names if n), sorted(addresses)


def make_server(out: Path, dns: list[str], ips: list[str]) -> Path:
    ca = make_ca(out)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    key, cert = _leaf(ca, dns[0] if dns else "appliance", ExtendedKeyUsageOID.SERVER_AUTH, sans)
    _write_key(out / "server.key", key)
    _write_cert(out / "server.crt", cert)
    return out / "server.crt"


def make_terminal(out: Path, name: str) -> Path:
    ca = make_ca(out)
    key, cert = _leaf(ca, check_name(name), ExtendedKeyUsageOID.CLIENT_AUTH, [])
    folder = out / "terminals" / name
    _write_key(folder / f"{name}.key", key)
    _write_cert(folder / f"{name}.crt", cert)
    _write_cert(folder / "ca.crt", ca[1])
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="appliance.api.certs", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("certs"), help="Folder for the CA, server and terminal files.")
    p.add_argument("--terminal", help="Make a certificate for this terminal (its token takes the same name).")
    p.add_argument("--dns", action="append", default=[], help="A DNS name of the appliance (default: this host's).")
    p.add_argument("--ip", action="append", default=[], help="An IP address of the appliance (default: this host's).")
    args = p.parse_args(argv)
    try:
        if args.terminal:
            folder = make_terminal(args.out, args.terminal)
            print(f"terminal {args.terminal}: {folder}/ ({args.terminal}.crt, {args.terminal}.key, ca.crt)")
            print(f"its token: appliance token add {args.terminal} --scope read|score")
            return 0
        found_dns, found_ips = host_names()
        dns, ips = args.dns or found_dns, args.ip or found_ips
        make_server(args.out, dns, ips)
    except (ValueError, OSError) as e:
        print(f"appliance.api.certs: {e}", file=sys.stderr)
        return 2
    print(f"server certificate: {args.out}/server.crt (key server.key) for {', '.join(dns + ips)}")
    print(f"CA: {args.out}/ca.crt; its key {args.out}/ca/ca.key signs terminals: keep it off the appliance.")
    print("config: server.tls_cert, server.tls_key; server.tls_client_ca = ca.crt for terminals with certificates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
