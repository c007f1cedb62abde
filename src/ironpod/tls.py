"""TLS for the control plane: a cluster CA, certificates it signs, and pinning it on first
contact by its hash (as ``kubeadm join --discovery-token-ca-cert-hash`` does).

The controller makes the CA at its first start with TLS on (``{state}/tls/``: ``ca.pem``,
``ca.key``, ``server.pem``, ``server.key``; keys 0600 in a 0700 directory) unless it was given
a certificate of its own. Its join line names the CA's hash, ``sha256:`` and the hex SHA-256
of the CA certificate's SubjectPublicKeyInfo, computable with openssl too::

    openssl x509 -in ca.pem -pubkey -noout | openssl pkey -pubin -outform der | sha256sum

An agent given the hash fetches the CA from the controller (``GET /api/v1/tls/ca``, public:
a CA certificate is no secret), refuses it unless the hash matches, keeps it in its work
directory, and from then on verifies the controller, and every peer agent, against it. At
registration it sends a certificate request; the controller signs it for the agent's address,
so agents serve HTTPS (logs, snapshot replication) under the same CA.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ironpod.errors import ConfigError
from ironpod.private import private_dir, write_private

HASH_PREFIX = "sha256:"
CA_ROUTE = "/api/v1/tls/ca"
#: The header the CA comes with: its HMAC under the join token (:func:`ca_signature`).
CA_SIGNATURE_HEADER = "X-Ironpod-CA-Signature"
_CA_DAYS = 3650
_CERT_DAYS = 825  # the most Apple's and browsers' rules allow a leaf; any lifetime works here


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS server needs, and the CA its clients verify it against."""

    cert: Path
    key: Path
    ca: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def ca_hash(ca_pem: bytes) -> str:
    """``sha256:<hex>`` of the CA certificate's SubjectPublicKeyInfo (kubeadm's pin)."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return HASH_PREFIX + hashlib.sha256(spki).hexdigest()


def check_hash(expected: str) -> str:
    """``expected`` normalised, or a ConfigError naming what a CA hash looks like."""
    value = expected.strip().lower()
    digest = value.removeprefix(HASH_PREFIX)
    if not value.startswith(HASH_PREFIX) or len(digest) != 64 or not _is_hex(digest):
        raise ConfigError(
            f"CA hash {expected[:80]!r}: expected sha256: and 64 hex digits (the controller "
            "prints it at start)"
        )
    return value


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


class Authority:
    """The cluster's CA: it signs the controller's certificate and each agent's."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, directory: Path, name: str = "ironpod cluster CA") -> Authority:
        private_dir(directory)
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        if cert_path.exists() and key_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"{key_path}: not the EC key ironpod makes")
            return cls(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, _key_pem(key))
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key)

    def sign(
        self, public_key: ec.EllipticCurvePublicKey, common_name: str, names: list[str]
    ) -> bytes:
        """A server-and-client certificate for ``names`` (DNS names or IP addresses), PEM."""
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=_CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def sign_request(self, csr_pem: str, names: list[str]) -> str:
        """Sign an agent's certificate request for ``names`` only (never the names it asks
        for: the controller decides what a node may call itself)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise ConfigError(f"certificate request: not a PEM CSR ({exc})") from None
        public = csr.public_key()
        if not csr.is_signature_valid or not isinstance(public, ec.EllipticCurvePublicKey):
            raise ConfigError("certificate request: bad signature or not an EC key")
        return self.sign(public, names[0] if names else "ironpod-agent", names).decode()

    def issue_files(self, directory: Path, stem: str, names: list[str]) -> TlsFiles:
        """A key and a certificate signed here, as ``{stem}.key`` / ``{stem}.pem``."""
        private_dir(directory)
        key = ec.generate_private_key(ec.SECP256R1())
        cert, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        write_private(key_path, _key_pem(key))
        write_private(cert, self.sign(key.public_key(), names[0], names))
        ca = directory / "ca.pem"
        if not ca.exists() or ca.read_bytes() != self.pem:
            write_private(ca, self.pem)
        return TlsFiles(cert=cert, key=key_path, ca=ca)


def controller_files(state_dir: Path, host: str, extra_names: list[str]) -> TlsFiles:
    """The controller's CA and certificate under ``{state_dir}/tls``, made at first start; a
    certificate that lacks one of today's names is issued again (the CA stays)."""
    directory = state_dir / "tls"
    ca = Authority.load_or_create(directory)
    names = server_names(host, extra_names)
    files = TlsFiles(
        cert=directory / "server.pem", key=directory / "server.key", ca=directory / "ca.pem"
    )
    if not (files.cert.exists() and files.key.exists() and _covers(files.cert, names)):
        files = ca.issue_files(directory, "server", names)
    return files


def server_names(host: str, extra: list[str]) -> list[str]:
    """What a server bound to ``host`` is reached as: the host, this machine's names, loopback."""
    names = [] if host in ("0.0.0.0", "::", "") else [host]
    names += [socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1", "::1", *extra]
    return list(dict.fromkeys(n for n in names if n))


def _covers(cert_path: Path, names: list[str]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return all(str(ipaddress.ip_address(n)) in have if is_ip(n) else n in have for n in names)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback (where plain HTTP stays on the box)."""
    return host.strip("[]") in ("localhost", "::1") or host.startswith("127.")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# -- the agent's side


def new_request(names: list[str]) -> tuple[bytes, str]:
    """(key PEM, CSR PEM) for an agent reached as ``names``."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(_san(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM).decode()


def client_context(ca_file: Path) -> ssl.SSLContext:
    """Verifies servers against the cluster CA only (not the system's trust store)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


class NotReachableError(ConfigError):
    """The controller did not answer (not up yet, or the network): worth trying again."""


def ca_signature(ca_pem: bytes, join_token: str) -> str:
    """What the controller sends with its CA: an HMAC of it under the join token, so a node
    that knows only the token can tell the CA came from a controller that knows it too (as
    kubeadm's token discovery signs its cluster-info)."""
    mac = hmac.new(join_token.encode(), b"ironpod-ca\0" + ca_pem, "sha256").hexdigest()
    return f"hmac-sha256:{mac}"


def _get_ca(url: str, timeout_s: float) -> tuple[bytes, str]:
    """(the CA PEM, its signature header) from an https controller, unverified."""
    import httpx  # the agent imports it anyway; keeps this module light for the CLI

    try:
        reply = httpx.get(url.rstrip("/") + CA_ROUTE, verify=False, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise NotReachableError(f"cannot fetch the CA from {url}: {exc}") from None
    if reply.status_code != 200:
        raise ConfigError(f"{url}{CA_ROUTE} answered {reply.status_code}: is TLS on there?")
    try:
        ca_hash(reply.content)
    except ValueError:
        raise ConfigError(f"{url}{CA_ROUTE} did not give a PEM certificate") from None
    return reply.content, reply.headers.get(CA_SIGNATURE_HEADER, "")


def fetch_ca_signed(url: str, join_token: str, timeout_s: float = 10.0) -> bytes:
    """The controller's CA, accepted only with its signature under ``join_token`` (the
    nodes of an ``ironpod launch`` share the token, not a CA hash). Weaker than a pin: any
    holder of the token could pose as the controller."""
    pem, signature = _get_ca(url, timeout_s)
    if not hmac.compare_digest(signature, ca_signature(pem, join_token)):
        raise ConfigError(
            f"the controller at {url} did not sign its CA with this node's join token: "
            "refusing to join (another token, or someone between this node and it)"
        )
    return pem


def fetch_ca(url: str, expected_hash: str, timeout_s: float = 10.0) -> bytes:
    """The controller's CA, fetched without verification and accepted only if its hash is
    ``expected_hash``: what makes first contact safe against a man in the middle."""
    want = check_hash(expected_hash)
    pem, _ = _get_ca(url, timeout_s)
    got = ca_hash(pem)
    if not hmac.compare_digest(got, want):
        raise ConfigError(
            f"the controller at {url} presented a CA with hash {got}, not the {want} this "
            "node was told to trust: refusing to join (a wrong --ca-hash, or someone between "
            "this node and the controller)"
        )
    return pem


@dataclass(frozen=True)
class AgentTls:
    """An agent's TLS: how it verifies the controller, its own serving certificate, and how it
    verifies its peers (the CA that signed that certificate)."""

    controller: ssl.SSLContext
    server: ssl.SSLContext
    peers: ssl.SSLContext
    peer_ca: Path


def agent_tls(
    workdir: Path,
    join_url: str,
    address: str,
    *,
    ca_hash_pin: str | None,
    ca_file: Path | None,
    request_certificate: Callable[[ssl.SSLContext, str, str], tuple[str, str]],
) -> AgentTls | None:
    """Set up an agent's TLS under ``{workdir}/tls`` (None for an http:// join URL).

    The controller's CA comes from ``ca_file``, else from an earlier join's pinned copy, else
    is fetched and checked against ``ca_hash_pin``. ``request_certificate(ctx, csr, address)``
    asks the controller (verified with ``ctx``) to sign ``csr``: (cert PEM, cluster CA PEM).
    """
    if not join_url.startswith("https://"):
        if ca_hash_pin or ca_file:
            raise ConfigError(f"--join {join_url}: a CA hash or file needs an https:// URL")
        return None
    directory = private_dir(workdir / "tls")
    pinned = directory / "controller-ca.pem"
    if ca_file is not None:
        if not ca_file.is_file():
            raise ConfigError(f"--ca-file {ca_file}: no such file")
        trust = ca_file
    elif pinned.exists() and (ca_hash_pin is None or _pin_matches(pinned, ca_hash_pin)):
        trust = pinned
    elif ca_hash_pin:
        write_private(pinned, fetch_ca(join_url, ca_hash_pin))
        trust = pinned
    else:
        raise ConfigError(
            f"--join {join_url}: TLS needs the controller's CA: --ca-hash sha256:... (the "
            "controller prints it at start) or --ca-file PATH"
        )
    controller = client_context(trust)
    cert, key, peer_ca = directory / "agent.pem", directory / "agent.key", directory / "ca.pem"
    if not (
        cert.exists() and key.exists() and peer_ca.exists() and _valid_for(cert, peer_ca, address)
    ):
        key_pem, csr = new_request([address])
        cert_pem, ca_pem = request_certificate(controller, csr, address)
        write_private(key, key_pem)
        write_private(cert, cert_pem.encode())
        write_private(peer_ca, ca_pem.encode())
    files = TlsFiles(cert=cert, key=key, ca=peer_ca)
    return AgentTls(
        controller=controller,
        server=server_context(files),
        peers=client_context(peer_ca),
        peer_ca=peer_ca,
    )


def _pin_matches(path: Path, pin: str) -> bool:
    try:
        return hmac.compare_digest(ca_hash(path.read_bytes()), check_hash(pin))
    except ValueError:
        return False


def _valid_for(cert_path: Path, ca_path: Path, address: str) -> bool:
    """``cert_path`` names ``address``, is signed by ``ca_path`` and has a month left."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    return left > dt.timedelta(days=30) and _covers(cert_path, [address])
