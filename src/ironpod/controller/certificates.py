"""The controller's TLS routes: its CA for first contact, and agents' serving certificates.

``GET /api/v1/tls/ca`` needs no token (an agent that knows only the CA's hash fetches it and
checks the hash, :func:`ironpod.tls.fetch_ca`); it comes with its HMAC under the join token,
for nodes that know only the token (:func:`ironpod.tls.fetch_ca_signed`).
``POST /api/v1/nodes/certificate`` needs the join token and signs an agent's request for the
one address it serves on.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from ironpod import tls
from ironpod.errors import ConfigError
from ironpod.wire import CertificateReply, CertificateRequest

_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


@dataclass
class ControllerTls:
    """The CA that signs agents' certificates, and how the controller verifies agents (its
    calls to them: a rank's log)."""

    authority: tls.Authority
    agents: ssl.SSLContext


def router(cluster: ControllerTls, node: Callable[..., Any], join_token: str) -> APIRouter:
    """``node`` is the join-token dependency of the node routes."""
    routes = APIRouter(prefix="/api/v1")
    signature = tls.ca_signature(cluster.authority.pem, join_token)

    @routes.get(
        tls.CA_ROUTE.removeprefix("/api/v1"),
        response_class=Response,
        responses={200: {"content": {"application/x-pem-file": {}}, "description": "the CA"}},
    )
    def ca() -> Response:
        return Response(
            cluster.authority.pem,
            media_type="application/x-pem-file",
            headers={tls.CA_SIGNATURE_HEADER: signature},
        )

    @routes.post("/nodes/certificate", dependencies=[Depends(node)])
    def certificate(body: CertificateRequest) -> CertificateReply:
        address = body.address.strip("[]")
        if not (tls.is_ip(address) or _HOST_NAME.fullmatch(address)):
            raise HTTPException(422, f"address {body.address[:80]!r}: not a host name or an IP")
        try:
            pem = cluster.authority.sign_request(body.csr_pem, [address])
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None
        return CertificateReply(cert_pem=pem, ca_pem=cluster.authority.pem.decode())

    return routes
