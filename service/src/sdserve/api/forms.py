"""multipart/form-data bodies (OpenAI's image edits), read with the standard library: a route
declares `Form` and gets the parts. The body has passed the middleware's size and time limits."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from typing import Annotated

from fastapi import Depends, Request

from ..errors import Problem

MAX_PARTS = 64  # far more than any client sends; bounds the work a hostile body can ask for


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    data: bytes


def _header_params(value: str) -> Message:
    m = Message()
    m["content-type"] = value
    return m


def parse(content_type: str, body: bytes) -> list[Part]:
    """The parts of a multipart/form-data body; 400 when it is not one."""
    ctype = _header_params(content_type)
    boundary = ctype.get_param("boundary")
    if ctype.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise Problem("the request body must be multipart/form-data", None, status=400, code="invalid_form")
    chunks = body.split(b"--" + boundary.encode("latin-1"))
    parts: list[Part] = []
    for raw in chunks[1:]:
        if raw.startswith(b"--"):  # the closing delimiter
            return parts
        head, sep, data = raw.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep or not data.endswith(b"\r\n") or len(parts) >= MAX_PARTS:
            break
        disposition = next(
            (
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-disposition:")
            ),
            None,
        )
        if disposition is None:
            break
        params = _header_params("form-data;" + disposition.decode("utf-8", "replace").split(";", 1)[-1])
        name, filename = params.get_param("name"), params.get_param("filename")
        if not isinstance(name, str):
            break
        parts.append(Part(name, filename if isinstance(filename, str) else None, data[:-2]))
    raise Problem("the multipart/form-data body is malformed", None, status=400, code="invalid_form")


async def read_form(request: Request) -> list[Part]:
    return parse(request.headers.get("content-type", ""), await request.body())


Form = Annotated[list[Part], Depends(read_form)]
