"""Signed download URLs of the local storage backend (the embedded default). The URL is the only
credential: its HMAC covers key, expiry, file name and content type, so an expired or altered one is
refused (403). Ranges as on ``/assets/{id}/content``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from comfyfleet.api.deps import get_runtime
from comfyfleet.api.routes.assets import stream_blob
from comfyfleet.errors import NotFound
from comfyfleet.storage.local import URL_PATH, LocalStorage

router = APIRouter(tags=["storage"])


@router.get(URL_PATH + "{token}", response_model=None)
async def local_download(
    token: str, request: Request, range_header: Annotated[str | None, Header(alias="Range")] = None
) -> Response:
    runtime = get_runtime(request)
    storage = runtime.storage
    if not isinstance(storage, LocalStorage):
        raise NotFound("Not found")
    grant = storage.verify_signed(token)
    if not await storage.exists(grant.key):
        raise NotFound("Not found")
    size = await storage.size(grant.key)
    return stream_blob(
        runtime,
        grant.key,
        size=size,
        content_type=grant.content_type,
        filename=grant.filename,
        range_header=range_header,
    )
