"""TLS files and SASL settings for a test broker with a SASL_SSL client listener (see tests/kafka_broker.py).

    tls = make_tls_files(folder)                       # a throwaway CA, a broker and a client certificate (openssl)
    users = {"alice": password}
    with KafkaBroker(extra_listeners=["SASL_SSL"], extra_properties=sasl_ssl_properties(tls, users),
                     format_args=scram_format_args(users)) as broker:
        KafkaProducer(**sasl_ssl_client(broker.listeners["SASL_SSL"], tls, "SCRAM-SHA-512", "alice", password))

The broker's SASL_SSL listener offers PLAIN (users in its JAAS config) and SCRAM-SHA-512 (users written into the
KRaft metadata when the storage is formatted, `StorageTool format --add-scram`), and requires a client certificate
signed by the test CA. Its inter-broker and controller listeners stay PLAINTEXT on 127.0.0.1.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TlsFiles", "make_tls_files", "sasl_ssl_properties", "scram_format_args", "sasl_ssl_client"]

# No separators of --add-scram's [name=...,password=...], JAAS quoting or kafka.sh's whitespace split.
_SAFE = re.compile(r"[A-Za-z0-9_.~-]+")

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA certificate, the broker's key and chain in one file, the client's certificate and key."""

    ca: Path
    broker_keystore: Path
    client_cert: Path
    client_key: Path


def _openssl(folder: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`openssl {' '.join(args)}` failed (exit {done.returncode}):\n{done.stderr}")


def make_tls_files(folder: Path, days: int = 2) -> TlsFiles:
    """A throwaway CA and, signed by it, a broker certificate for 127.0.0.1/localhost and a client certificate.

    Keys are unencrypted PKCS#8 PEM (what Kafka's PEM keystore and Python's ssl module both read). Raises
    RuntimeError when openssl is missing or fails.
    """
    if shutil.which("openssl") is None:
        raise RuntimeError("the SASL_SSL tests need the `openssl` command on PATH to make their TLS certificates")
    folder.mkdir(parents=True, exist_ok=True)
    cnf = folder / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF)
    rsa = ("-newkey", "rsa:2048", "-nodes", "-config", str(cnf))
    _openssl(folder, "req", "-x509", *rsa, "-extensions", "ca_ext", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", str(days), "-subj", "/CN=detector test CA")
    for name, cn, ext, serial in (("broker", "localhost", "server_ext", "1001"),
                                  ("client", "detector", "client_ext", "1002")):
        _openssl(folder, "req", "-new", *rsa, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-set_serial", serial, "-days", str(days), "-extfile", str(cnf), "-extensions", ext,
                 "-out", f"{name}.pem")
    keystore = folder / "broker.keystore.pem"
    keystore.write_text((folder / "broker.key").read_text() + (folder / "broker.pem").read_text()
                        + (folder / "ca.pem").read_text())
    for key in (folder / "ca.key", folder / "broker.key", folder / "client.key", keystore):
        key.chmod(0o600)
    return TlsFiles(folder / "ca.pem", keystore, folder / "client.pem", folder / "client.key")


def _check_users(users: Mapping[str, str]) -> None:
    for name, password in users.items():
        if not (_SAFE.fullmatch(name) and _SAFE.fullmatch(password)):
            raise ValueError(f"user {name!r}: names and passwords may hold only letters, digits and _ . ~ -")


def sasl_ssl_properties(tls: TlsFiles, users: Mapping[str, str], listener: str = "SASL_SSL") -> str:
    """server.properties lines for `listener`: TLS with a required client certificate, SASL PLAIN and SCRAM-SHA-512.

    `users` (name -> password) become PLAIN users; give the same to scram_format_args for SCRAM.
    """
    _check_users(users)
    p = f"listener.name.{listener.lower()}."
    plain_users = " ".join(f'user_{name}="{password}"' for name, password in users.items())
    return "\n".join([
        f"{p}sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-512",
        f"{p}plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};",
        f"{p}scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;",
        f"{p}ssl.keystore.type=PEM",
        f"{p}ssl.keystore.location={tls.broker_keystore}",
        f"{p}ssl.truststore.type=PEM",
        f"{p}ssl.truststore.location={tls.ca}",
        f"{p}ssl.client.auth=required",
        "",
    ])


def scram_format_args(users: Mapping[str, str], mechanism: str = "SCRAM-SHA-512") -> list[str]:
    """StorageTool format arguments that create SCRAM users in the KRaft metadata (KafkaBroker format_args)."""
    _check_users(users)
    out: list[str] = []
    for name, password in users.items():
        out += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
    return out


def sasl_ssl_client(bootstrap: str, tls: TlsFiles, mechanism: str, username: str, password: str) -> dict[str, Any]:
    """kafka-python keyword arguments for a SASL_SSL client of that broker (with the client certificate)."""
    return {"bootstrap_servers": bootstrap, "security_protocol": "SASL_SSL", "sasl_mechanism": mechanism,
            "sasl_plain_username": username, "sasl_plain_password": password, "ssl_cafile": str(tls.ca),
            "ssl_certfile": str(tls.client_cert), "ssl_keyfile": str(tls.client_key)}
