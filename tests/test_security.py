"""TLS, mutual TLS and bearer tokens, against real servers with certificates made here.

Each refusal is shown to happen where it should (the handshake for TLS, the interceptor for
tokens: a refused call never reaches the service's request counter), to say what was wrong
and nothing else, and to leave the server serving.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from conftest import random_boxes
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from test_service_support import (
    assert_bitwise_equal,
    in_process_server,
    roi_server_command,
    start_server_process,
)

import roi_kernels
from roi_client import RoIClient, RoIError
from roi_client.channel import call_metadata
from roi_server.auth import INVALID, MALFORMED, MISSING, TokenAuthInterceptor

TOKEN = "s3cr3t-t0ken-for-tests_0123456789"

# What must never reach a client: file paths, Python or C++ tracebacks.
INTERNALS = re.compile(r"Traceback|File \"|\.py\b|\.cpp\b|(/[\w.\-]+){2,}|Exception raised from")


# ---------------------------------------------------------------------------------------------
# Certificates, made per test module


@dataclass
class Issued:
    cert: Path
    key: Path


def _write_key(key, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


class Authority:
    """A CA that issues server and client certificates into ``folder``."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / f"{name}-ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        out = Issued(self.folder / f"{self.name}-{common_name}.pem", self.folder / f"{self.name}-{common_name}.key")
        out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, out.key)
        return out


@dataclass
class PKI:
    ca: Authority
    other_ca: Authority
    server: Issued
    client: Issued
    rogue_client: Issued  # signed by the other CA
    token_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "roi-test")
    other = Authority(folder, "elsewhere")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    return PKI(
        ca=ca,
        other_ca=other,
        server=ca.issue("roi-server", server=True),
        client=ca.issue("pipeline", server=False),
        rogue_client=other.issue("intruder", server=False),
        token_file=token_file,
    )


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def request_case(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 12, 14, generator=gen)
    boxes = random_boxes(gen, 9, 192, 224, num_images=2)
    return x, boxes, roi_kernels.roi_align(x, boxes, 5, 1 / 16, 2, True)


def assert_serves(client: RoIClient, case) -> None:
    x, boxes, want = case
    assert_bitwise_equal(client.roi_align(x, boxes, 5, 1 / 16, 2, True), want)


def refused(call, code: grpc.StatusCode) -> RoIError:
    with pytest.raises(RoIError) as err:
        call()
    assert err.value.code == code, err.value
    assert not INTERNALS.search(err.value.details), err.value.details
    return err.value


def requests_counted(srv, code: str | None = None, exclude: str | None = None) -> float:
    """roi_requests_total summed over its labels (those with ``code`` only, or without
    ``exclude``)."""
    samples = srv.server.metrics.registry.collect()
    return sum(
        s.value
        for m in samples
        if m.name == "roi_requests"
        for s in m.samples
        if s.name == "roi_requests_total"
        and (code is None or s.labels["code"] == code)
        and (exclude is None or s.labels["code"] != exclude)
    )


# ---------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def tls_server(pki):
    with in_process_server(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key)) as srv:
        yield srv


def test_tls_serves_the_same_results(tls_server, pki, request_case):
    with RoIClient(tls_server.address, tls_ca=pki.ca.path, timeout=30) as client:
        assert_serves(client, request_case)
        assert client.health() == "SERVING"
        assert client.describe().device == "cpu"
    # The CA may also be given as bytes, and the name to verify set explicitly.
    with RoIClient(tls_server.address, tls_ca=pki.ca.path.read_bytes(), tls_server_name="localhost") as client:
        assert_serves(client, request_case)


def test_tls_server_refuses_plaintext_and_untrusted_clients(tls_server, pki, request_case):
    before = requests_counted(tls_server)
    with RoIClient(tls_server.address, max_attempts=1, timeout=5) as plain:
        refused(plain.health, grpc.StatusCode.UNAVAILABLE)
        refused(lambda: assert_serves(plain, request_case), grpc.StatusCode.UNAVAILABLE)
    # A client that trusts another CA does not accept the server's certificate.
    with RoIClient(tls_server.address, tls_ca=pki.other_ca.path, max_attempts=1, timeout=5) as wrong_ca:
        refused(lambda: assert_serves(wrong_ca, request_case), grpc.StatusCode.UNAVAILABLE)
    # A name the certificate does not carry.
    with RoIClient(tls_server.address, tls_ca=pki.ca.path, tls_server_name="elsewhere.example", max_attempts=1, timeout=5) as c:
        refused(c.health, grpc.StatusCode.UNAVAILABLE)
    assert requests_counted(tls_server) == before
    with RoIClient(tls_server.address, tls_ca=pki.ca.path) as client:
        assert_serves(client, request_case)


# ---------------------------------------------------------------------------------------------
# Mutual TLS


@pytest.fixture(scope="module")
def mtls_server(pki):
    with in_process_server(
        tls_cert=str(pki.server.cert), tls_key=str(pki.server.key), tls_client_ca=str(pki.ca.path)
    ) as srv:
        yield srv


def test_mtls_accepts_only_certificates_of_its_ca(mtls_server, pki, request_case):
    before = requests_counted(mtls_server)
    with RoIClient(mtls_server.address, tls_ca=pki.ca.path, max_attempts=1, timeout=5) as no_cert:
        refused(lambda: assert_serves(no_cert, request_case), grpc.StatusCode.UNAVAILABLE)
        refused(no_cert.health, grpc.StatusCode.UNAVAILABLE)
    with RoIClient(
        mtls_server.address,
        tls_ca=pki.ca.path,
        tls_cert=pki.rogue_client.cert,
        tls_key=pki.rogue_client.key,
        max_attempts=1,
        timeout=5,
    ) as rogue:
        refused(lambda: assert_serves(rogue, request_case), grpc.StatusCode.UNAVAILABLE)
    assert requests_counted(mtls_server) == before, "a refused handshake reached the service"

    with RoIClient(mtls_server.address, tls_ca=pki.ca.path, tls_cert=pki.client.cert, tls_key=pki.client.key) as ok:
        assert_serves(ok, request_case)
        assert ok.health() == "SERVING"
    assert requests_counted(mtls_server) == before + 1


def test_client_tls_arguments_are_checked(pki):
    with pytest.raises(RoIError, match="tls_cert and tls_key"):
        RoIClient("localhost:1", tls_ca=pki.ca.path, tls_cert=pki.client.cert)
    with pytest.raises(RoIError, match="tls_ca: cannot read"):
        RoIClient("localhost:1", tls_ca=pki.ca.path.with_name("missing.pem"))
    with pytest.raises(RoIError, match="tls=False"):
        RoIClient("localhost:1", tls=False, tls_ca=pki.ca.path)
    with pytest.raises(RoIError, match="token"):
        RoIClient("localhost:1", token="two words")


# ---------------------------------------------------------------------------------------------
# Tokens


@pytest.fixture(scope="module")
def token_server(pki):
    with in_process_server(auth_token_file=str(pki.token_file)) as srv:
        yield srv


def test_token_right_wrong_missing(token_server, request_case):
    before = requests_counted(token_server, exclude="UNAUTHENTICATED")
    refused_before = requests_counted(token_server, code="UNAUTHENTICATED")
    pool_refused_before = token_server.server.metrics.registry.get_sample_value(
        "roi_requests_total", {"protocol": "roi_v1", "op": "roi_align", "code": "UNAUTHENTICATED"}
    ) or 0.0
    with RoIClient(token_server.address, max_attempts=1, timeout=10) as anonymous:
        err = refused(lambda: assert_serves(anonymous, request_case), grpc.StatusCode.UNAUTHENTICATED)
        assert err.details == MISSING
        err = refused(anonymous.describe, grpc.StatusCode.UNAUTHENTICATED)
        assert err.details == MISSING
        # The stream is refused as a whole.
        x, boxes, _ = request_case
        from roi_client import EncodedRequest

        reqs = [EncodedRequest.roi_align(x, boxes, 5, 1 / 16, 2, True).with_id(str(i)) for i in range(3)]
        refused(lambda: list(anonymous.pool_stream(reqs)), grpc.StatusCode.UNAUTHENTICATED)
    with RoIClient(token_server.address, token=TOKEN[:-1] + "X", max_attempts=1) as wrong:
        err = refused(lambda: assert_serves(wrong, request_case), grpc.StatusCode.UNAUTHENTICATED)
        assert err.details == INVALID
        assert TOKEN not in err.details and TOKEN[:-1] not in err.details
    with RoIClient(token_server.address, token=TOKEN + TOKEN, max_attempts=1) as longer:
        refused(lambda: assert_serves(longer, request_case), grpc.StatusCode.UNAUTHENTICATED)
    assert requests_counted(token_server, exclude="UNAUTHENTICATED") == before, "a refused call reached the service"
    # Refusals are counted, as every other answer: three Pool calls under their op, the
    # stream under "unknown" (its requests were not read), Describe not at all (no request).
    assert requests_counted(token_server, code="UNAUTHENTICATED") == refused_before + 4
    assert token_server.server.metrics.registry.get_sample_value(
        "roi_requests_total", {"protocol": "roi_v1", "op": "roi_align", "code": "UNAUTHENTICATED"}
    ) == pool_refused_before + 3

    with RoIClient(token_server.address, token=TOKEN) as ok:
        assert_serves(ok, request_case)
        assert ok.describe().device == "cpu"
        got = {r.id: r for r in ok.pool_stream(reqs)}
        assert set(got) == {"0", "1", "2"}
        for r in got.values():
            assert_bitwise_equal(r.output, request_case[2])
    assert requests_counted(token_server, exclude="UNAUTHENTICATED") == before + 4


def test_malformed_authorization_metadata(token_server):
    channel = grpc.insecure_channel(token_server.address)
    describe = channel.unary_unary("/roi.v1.RoIService/Describe")
    try:
        for value, message in (
            (f"Basic {TOKEN}", MALFORMED),
            ("Bearer", MALFORMED),
            (TOKEN, MALFORMED),
            (f"bearer {TOKEN}", None),  # the scheme is case-insensitive (RFC 7235)
            (f"Bearer  {TOKEN} ", None),
        ):
            if message is None:
                assert describe(b"", metadata=(("authorization", value),), timeout=10)
                continue
            with pytest.raises(grpc.RpcError) as err:
                describe(b"", metadata=(("authorization", value),), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details() == message
    finally:
        channel.close()


def test_health_stays_open_and_reflection_needs_the_token(token_server):
    with RoIClient(token_server.address, timeout=10) as anonymous:
        assert anonymous.health() == "SERVING"
        assert anonymous.health("roi.v1.RoIService") == "SERVING"
    channel = grpc.insecure_channel(token_server.address)
    try:
        with pytest.raises(grpc.RpcError) as err:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()
    authed = grpc.intercept_channel(grpc.insecure_channel(token_server.address), _MetadataAdder(call_metadata(TOKEN)))
    try:
        services = ProtoReflectionDescriptorDatabase(authed).get_services()
        assert "roi.v1.RoIService" in services
    finally:
        authed.close()


class _MetadataAdder(grpc.StreamStreamClientInterceptor, grpc.UnaryUnaryClientInterceptor):
    """Adds fixed metadata to every call (reflection's client has no metadata argument)."""

    def __init__(self, metadata):
        self.metadata = tuple(metadata)

    def _details(self, details):
        class Details(grpc.ClientCallDetails):
            pass

        d = Details()
        d.method, d.timeout, d.credentials = details.method, details.timeout, details.credentials
        d.metadata = tuple(details.metadata or ()) + self.metadata
        d.wait_for_ready, d.compression = getattr(details, "wait_for_ready", None), getattr(details, "compression", None)
        return d

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)


def test_token_comparison():
    auth = TokenAuthInterceptor(TOKEN)
    assert auth.check((("authorization", f"Bearer {TOKEN}"),)) is None
    assert auth.check((("Authorization", f"Bearer {TOKEN}".encode()),)) is None
    assert auth.check(()) == MISSING
    assert auth.check(None) == MISSING
    assert auth.check((("authorization", f"Bearer {TOKEN[1:]}"),)) == INVALID
    assert auth.check((("authorization", "Bearer "),)) == MALFORMED
    with pytest.raises(ValueError):
        TokenAuthInterceptor("")


# ---------------------------------------------------------------------------------------------
# The CLI: TLS and token from the environment, no secret in the log, loadtest flags


def test_cli_tls_and_token_from_environment(tmp_path, pki, request_case):
    env = {
        "ROI_TLS_CERT": str(pki.server.cert),
        "ROI_TLS_KEY": str(pki.server.key),
        "ROI_TLS_CLIENT_CA": str(pki.ca.path),
        "ROI_AUTH_TOKEN": TOKEN,
        "ROI_LOG_LEVEL": "debug",
    }
    srv = start_server_process(tmp_path, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", env=env)
    try:
        assert "TLS, client certificates required, token required" in srv.log()
        mtls = dict(tls_ca=pki.ca.path, tls_cert=pki.client.cert, tls_key=pki.client.key)
        with RoIClient(srv.address, token=TOKEN, **mtls) as ok:
            assert_serves(ok, request_case)
        with RoIClient(srv.address, max_attempts=1, timeout=10, **mtls) as no_token:
            assert refused(lambda: assert_serves(no_token, request_case), grpc.StatusCode.UNAUTHENTICATED).details == MISSING
            assert no_token.health() == "SERVING"

        # roi-loadtest with its TLS and token flags.
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("roi-loadtest")),
                srv.address,
                "--workload", "tiny", "--requests", "6", "--warmup", "0", "--quiet",
                "--tls-ca", str(pki.ca.path), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key),
                "--token-file", str(pki.token_file), "--json", "-",
            ],
            capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stderr
        import json

        doc = json.loads(run.stdout[run.stdout.index("{"):])
        assert doc["runs"][0]["ok"] == 6 and doc["runs"][0]["error_count"] == 0, doc["runs"][0]
        # Without the token every request is refused, and the tester says so.
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("roi-loadtest")),
                srv.address, "--requests", "2", "--warmup", "0", "--quiet",
                "--tls-ca", str(pki.ca.path), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key),
            ],
            capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 3 and "UNAUTHENTICATED" in run.stderr, (run.returncode, run.stderr)
    finally:
        rc = srv.stop()
    log = srv.log()
    assert rc == 0, log
    assert TOKEN not in log, "the token was logged"


@pytest.mark.parametrize(
    "args, env, problem",
    [
        (["--tls-cert", "{cert}"], {}, "tls_cert and tls_key: give both"),
        (["--tls-cert", "{cert}", "--tls-key", "{missing}"], {}, "tls_key: cannot read"),
        (["--tls-cert", "{key}", "--tls-key", "{key}"], {}, "tls_cert: "),
        (["--tls-client-ca", "{ca}"], {}, "tls_client_ca needs tls_cert"),
        (["--auth-token-file", "{empty}"], {}, "the token is empty"),
        (["--auth-token-file", "{token}"], {"ROI_AUTH_TOKEN": TOKEN}, "give one"),
        ([], {"ROI_AUTH_TOKEN": "has space"}, "printable ASCII without spaces"),
    ],
)
def test_bad_security_settings_exit_2(tmp_path, pki, args, env, problem):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    paths = dict(
        cert=pki.server.cert, key=pki.server.key, ca=pki.ca.path, missing=tmp_path / "nope.pem", empty=empty,
        token=pki.token_file,
    )
    full_env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("ROI_") or k.startswith("ROI_KERNELS")}
    full_env.update(env)
    run = subprocess.run(
        roi_server_command() + [a.format(**paths) for a in args],
        capture_output=True, text=True, timeout=60, env=full_env,
    )
    assert run.returncode == 2, run.stderr
    assert problem in run.stderr
    assert "Traceback" not in run.stderr
    assert TOKEN not in run.stderr + run.stdout


def test_token_is_not_in_settings_repr():
    from roi_server.settings import Settings

    assert TOKEN not in repr(Settings(auth_token=TOKEN))


def test_server_log_never_holds_the_token(pki, caplog, request_case):
    caplog.set_level(logging.DEBUG)
    with in_process_server(auth_token_file=str(pki.token_file)) as srv:
        with RoIClient(srv.address, token="wrong-" + TOKEN, max_attempts=1) as wrong:
            refused(lambda: assert_serves(wrong, request_case), grpc.StatusCode.UNAUTHENTICATED)
        with RoIClient(srv.address, token=TOKEN) as ok:
            assert_serves(ok, request_case)
    assert "listening on" in caplog.text
    assert TOKEN not in caplog.text
