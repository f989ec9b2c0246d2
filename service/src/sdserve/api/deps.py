"""What routes declare they need, as types (FastAPI's `Annotated` dependencies): the service, the
caller's key name, the request id, the base of url results, and whether the client has gone."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.openapi.models import HTTPBase, HTTPBearer
from fastapi.security.base import SecurityBase

from ..errors import AuthError
from ..service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


class _KeyScheme(SecurityBase):
    """Documents a way to send the key in the OpenAPI document; `authenticate` does the checking."""

    def __init__(self, model, name: str) -> None:
        self.model = model
        self.scheme_name = name

    async def __call__(self) -> None:
        return None


_BEARER = _KeyScheme(HTTPBearer(description="Authorization: Bearer KEY"), "bearer")
_BASIC = _KeyScheme(
    HTTPBase(scheme="basic", description="HTTP Basic, any user name, the key as password (A1111 clients)"),
    "basic",
)


def credentials(request: Request) -> str | None:
    return key_in(request.headers.get("authorization", ""))


def key_in(header: str) -> str | None:
    """The key an Authorization header carries (Bearer, or Basic with the key as password)."""
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value.strip():
        return value.strip()
    if scheme == "basic" and value.strip():
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _user, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None


def authenticate(
    request: Request, service: ServiceDep, _bearer: None = Security(_BEARER), _basic: None = Security(_BASIC)
) -> str:
    """The key's name, or 401. Without keys (loopback only) everyone is "open"."""
    if not service.keys.enabled:
        name = "open"
    else:
        key = credentials(request)
        if key is None:
            raise AuthError(
                "an API key is required: send `Authorization: Bearer KEY` (or HTTP Basic with the key as password)"
            )
        name = service.keys.lookup(key)
        if name is None:
            raise AuthError("the API key is not valid")
    request.scope.setdefault("state", {})["key_name"] = name  # for the access log and metrics
    return name


KeyName = Annotated[str, Depends(authenticate)]


def request_id(request: Request) -> str:
    return request.state.request_id


RequestId = Annotated[str, Depends(request_id)]

# A host name or address with an optional port: what a forwarded host may be.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(:[0-9]{1,5})?")


def public_base(request: Request, service: ServiceDep) -> str:
    """Base of url results: PUBLIC_URL; else a trusted proxy's X-Forwarded-Proto/-Host; else the
    address the client connected to. Never the client's own Host header, which it can forge."""
    settings = service.settings
    if settings.public_url:
        return settings.public_url.rstrip("/")
    scheme = request.url.scheme
    host, port = request.scope.get("server") or (settings.host, settings.port)
    netloc = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if _from_trusted_proxy(request, service):
        proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        fwd_host = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
        if proto in ("http", "https"):
            scheme = proto
        if _HOST.fullmatch(fwd_host):
            netloc = fwd_host
    return f"{scheme}://{netloc}"


def _from_trusted_proxy(request: Request, service: ServiceDep) -> bool:
    networks = service.settings.trusted_proxy_networks()
    peer = request.client.host if request.client else None
    if not networks or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in networks)


PublicBase = Annotated[str, Depends(public_base)]


async def client_gone(request: Request) -> None:
    """Completes when the client disconnects (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
