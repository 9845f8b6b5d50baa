"""Test certificates generated with `cryptography`: a CA, a server certificate and a client certificate."""

from __future__ import annotations

import datetime as dt
from pathlib import Path


def certificates(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for "localhost" and a client certificate, as PEM files in tmp_path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def cert(subject_key, name, issuer_key=None, issuer_name=None, ca=False, san=None):
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)]))
            .public_key(subject_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(issuer_key or subject_key, hashes.SHA256())

    def write(name, obj):
        path = tmp_path / name
        if hasattr(obj, "private_bytes"):
            data = obj.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        else:
            data = obj.public_bytes(serialization.Encoding.PEM)
        path.write_bytes(data)
        return path

    ca_key = key()
    ca = cert(ca_key, "wombat-test-ca", ca=True)
    server_key, client_key = key(), key()
    return {
        "ca": write("ca.pem", ca),
        "server_cert": write(
            "server.pem", cert(server_key, "localhost", ca_key, "wombat-test-ca", san="localhost")
        ),
        "server_key": write("server.key", server_key),
        "client_cert": write("client.pem", cert(client_key, "client", ca_key, "wombat-test-ca")),
        "client_key": write("client.key", client_key),
    }
