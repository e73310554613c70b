"""HTTPS between agents and the server: `sandmill server --ssl-certfile/--ssl-keyfile` with
a certificate signed by a CA made in the test; an agent given that CA (--ca-file) runs
jobs; one without it refuses the server (its certificate is not verified) and exits 2."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent_support import start_agent
from support import wait_done


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca_and_cert(d: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 and localhost signed by it: (ca, cert, key)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("sandmill test CA")).issuer_name(_name("sandmill test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_agents_reach_an_https_server_with_a_self_signed_ca(pg_url, tmp_path, ws):
    from sandmill.localcluster import LocalCluster
    from support import TOKEN

    ca, cert, key = make_ca_and_cert(tmp_path)
    trust = ssl.create_default_context(cafile=str(ca))
    c = LocalCluster(pg_url, tmp_path / "c", token=TOKEN)
    try:
        c.spawn("server", "--port", str(c.port), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
        c.base = f"https://127.0.0.1:{c.port}"
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(c.base + "/health", verify=trust, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, c.logs()
            time.sleep(0.1)
        with httpx.Client(base_url=c.base, verify=trust) as plain:  # the CA is what makes it trusted
            with httpx.Client(base_url=c.base) as untrusting:
                try:
                    untrusting.get("/health")
                    raise AssertionError("a certificate of an unknown CA was accepted")
                except httpx.ConnectError as e:
                    assert "CERTIFICATE_VERIFY_FAILED" in str(e)
            tag = "edge" + uuid.uuid4().hex[:8]
            p = subprocess.run([sys.executable, "-m", "sandmill", "agent-token", "create", "--url", c.base,
                                "--ca-file", str(ca), "--group", "edge", "--tags", tag, "--expires", "1h"],
                               env=c.env, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr
            token = p.stdout.strip()
            blind = start_agent(c, token, "edge", [tag])
            assert blind.wait(timeout=60) == 2
            assert "CERTIFICATE_VERIFY_FAILED" in c.logs() or "certificate verify failed" in c.logs()
            start_agent(c, token, "edge", [tag], extra=["--ca-file", str(ca)])
            r = plain.post(f"/api/w/{ws}/jobs/run/preview", headers={"Authorization": f"Bearer {TOKEN}"},
                           json={"content": "def main():\n    return 'over tls'\n", "language": "python3",
                                 "tag": tag})
            assert r.status_code == 201, r.text
            plain.headers["Authorization"] = f"Bearer {TOKEN}"
            assert wait_done(plain, ws, r.text, timeout=60)["result"] == "over tls"
    finally:
        c.stop()
