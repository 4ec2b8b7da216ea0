"""Reading an HTTP request's body on the serving HTTP server: a size limit before it is read, and decompression."""

from __future__ import annotations

import gzip
import zlib

from starlette.requests import Request

from ._errors import RequestError


class BodyTooLarge(Exception):
    """A body over the server's limit (answered 413 without reading the rest)."""


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, refused (BodyTooLarge) past ``max_bytes`` before more is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"the body has {declared} bytes; the limit is {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"the body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decompress(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    if not encoding or encoding == "identity":
        return body
    try:
        if encoding == "gzip":
            out = gzip.decompress(body)
        elif encoding == "deflate":
            out = zlib.decompress(body)
        else:
            raise RequestError(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    except (OSError, zlib.error, EOFError) as exc:
        raise RequestError(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > max_bytes:
        raise BodyTooLarge(f"the body is over the limit of {max_bytes} bytes once decompressed")
    return out
