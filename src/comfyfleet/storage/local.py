"""Blobs as files under a directory, for single-host deployments and tests.

Download URLs point at the API (``{public_base_url}/api/v2/storage/local/{token}``); the token carries
key, expiry, filename and content type, HMAC-signed, so the route needs no database lookup: it calls
``verify_signed(token)`` and streams ``local_path(grant.key)`` (or ``open_read``) with the grant's headers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from comfyfleet.errors import Forbidden
from comfyfleet.storage.base import (
    BlobNotFound,
    SignedUrl,
    StorageError,
    check_content_type,
    check_range,
    validate_key,
)

URL_PATH = "/api/v2/storage/local/"
READ_CHUNK = 1 << 20
# Domain separation: a MAC made for download tokens is useless anywhere else the same key might be used.
_MAC_CONTEXT = b"comfyfleet/local-download/v1\n"
_MAX_TOKEN_LEN = 8192
_MIN_SIGNING_KEY_LEN = 16


class InvalidSignedUrl(Forbidden):
    """The token is malformed or its signature does not match (tampered, or signed with another key)."""

    code = "invalid_signature"


class ExpiredSignedUrl(InvalidSignedUrl):
    code = "url_expired"


@dataclass(frozen=True)
class LocalGrant:
    """What a verified token allows: GET ``key``, served as ``filename`` with ``content_type``."""

    key: str
    filename: str
    content_type: str
    expires_at: int  # unix seconds


class LocalStorage:
    def __init__(
        self,
        root: Path,
        *,
        signing_key: bytes,
        public_base_url: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(signing_key) < _MIN_SIGNING_KEY_LEN:
            raise ValueError(f"signing_key must be at least {_MIN_SIGNING_KEY_LEN} bytes")
        self._root = Path(root).resolve()
        self._root.mkdir(parents=True, exist_ok=True)
        self._signing_key = signing_key
        self._base_url = public_base_url.rstrip("/")
        self._clock = clock

    @property
    def root(self) -> Path:
        return self._root

    def local_path(self, key: str) -> Path:
        """The file backing ``key``; lets the API route serve it with sendfile and its own Range code."""
        path = self._root.joinpath(*validate_key(key).split("/"))
        # validate_key already rules escapes out; this guards against a future change to it.
        if not path.is_relative_to(self._root):
            raise StorageError(f"key {key!r} resolves outside the storage root")
        return path

    # -- blobs -------------------------------------------------------------------------------------

    async def put_file(self, key: str, path: str, content_type: str, *, consume: bool = False) -> None:
        # content_type is not stored: the signed URL carries it, as the S3 backend's presigned URL does.
        dest = self.local_path(key)
        try:
            await asyncio.to_thread(_put_file_sync, Path(path), dest, consume)
        except _SourceMissing:
            raise StorageError(f"local put {key!r}: source file {path!r} not found") from None
        except OSError as exc:
            raise StorageError(f"local put {key!r} failed: {exc}") from exc

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.local_path(key).is_file)

    async def size(self, key: str) -> int:
        path = self.local_path(key)
        try:
            st = await asyncio.to_thread(os.stat, path)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFound(key) from None
        except OSError as exc:
            raise StorageError(f"local stat {key!r} failed: {exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise BlobNotFound(key)
        return st.st_size

    async def delete(self, key: str) -> None:
        path = self.local_path(key)
        try:
            await asyncio.to_thread(os.unlink, path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            # A directory is a key prefix, not a blob: nothing to delete under this key.
            return
        except OSError as exc:
            raise StorageError(f"local delete {key!r} failed: {exc}") from exc

    async def open_read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        check_range(start, end)
        path = self.local_path(key)
        try:
            f = await asyncio.to_thread(_open_at, path, start)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise BlobNotFound(key) from None
        except OSError as exc:
            raise StorageError(f"local open {key!r} failed: {exc}") from exc
        try:
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                want = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                try:
                    chunk = await asyncio.to_thread(f.read, want)
                except OSError as exc:
                    raise StorageError(f"local read {key!r} failed: {exc}") from exc
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            f.close()

    async def get_to_file(self, key: str, path: str) -> None:
        src = self.local_path(key)
        try:
            await asyncio.to_thread(_atomic_copy, src, Path(path), durable=False)
        except _SourceMissing:
            raise BlobNotFound(key) from None
        except OSError as exc:
            raise StorageError(f"local get {key!r} failed: {exc}") from exc

    # -- signed URLs -------------------------------------------------------------------------------

    async def download_url(self, key: str, *, filename: str, content_type: str, lifetime_s: int) -> SignedUrl:
        validate_key(key)
        if lifetime_s <= 0:
            raise ValueError("lifetime_s must be positive")
        check_content_type(content_type)
        expires_at = int(self._clock()) + lifetime_s
        token = self._sign(key, filename=filename, content_type=content_type, expires_at=expires_at)
        return SignedUrl(
            url=f"{self._base_url}{URL_PATH}{token}",
            expires_at=datetime.fromtimestamp(expires_at, UTC),
        )

    def _sign(self, key: str, *, filename: str, content_type: str, expires_at: int) -> str:
        """``<payload>.<mac>``, both base64url: URL-safe, so the token is one path segment."""
        payload = json.dumps([key, expires_at, filename, content_type], separators=(",", ":"))
        payload_b64 = _b64encode(payload.encode())
        return f"{payload_b64}.{self._mac(payload_b64)}"

    def verify_signed(self, token: str, *, now: float | None = None) -> LocalGrant:
        """The grant a token carries; ``InvalidSignedUrl`` if altered, ``ExpiredSignedUrl`` if expired."""
        if len(token) > _MAX_TOKEN_LEN:
            raise InvalidSignedUrl("download token too long")
        payload_b64, sep, mac = token.partition(".")
        # Compare the encoded MACs as bytes: constant-time, and unlike decoding the given MAC first it
        # refuses every spelling but the canonical one (the base64 decoder would skip stray characters).
        if not sep or not hmac.compare_digest(self._mac(payload_b64).encode(), mac.encode()):
            raise InvalidSignedUrl("download token signature mismatch")
        grant = _parse_payload(payload_b64)
        if (self._clock() if now is None else now) >= grant.expires_at:
            raise ExpiredSignedUrl("download URL expired")
        return grant

    def _mac(self, payload_b64: str) -> str:
        digest = hmac.new(self._signing_key, _MAC_CONTEXT + payload_b64.encode(), hashlib.sha256).digest()
        return _b64encode(digest)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _parse_payload(payload_b64: str) -> LocalGrant:
    # Only reached with a valid MAC, so a failure here means a format change, not an attack.
    try:
        raw = base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4))
        key, expires_at, filename, content_type = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidSignedUrl("malformed download token") from None
    if not (
        isinstance(key, str)
        and isinstance(expires_at, int)
        and isinstance(filename, str)
        and isinstance(content_type, str)
    ):
        raise InvalidSignedUrl("malformed download token")
    return LocalGrant(
        key=validate_key(key), filename=filename, content_type=content_type, expires_at=expires_at
    )


# -- blocking helpers, run in a worker thread ----------------------------------------------------------


class _SourceMissing(Exception):
    pass


def _open_at(path: Path, start: int) -> BinaryIO:
    # Unbuffered: every read is one syscall straight into the returned bytes, no second copy.
    f: BinaryIO = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller's generator
    try:
        f.seek(start)
    except BaseException:
        f.close()
        raise
    return f


def _put_file_sync(src: Path, dest: Path, consume: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if consume:
        try:
            _atomic_link(src, dest)
            return
        except (FileNotFoundError, NotADirectoryError):
            raise _SourceMissing from None
        except OSError as exc:
            # Another filesystem, or one without hard links: copy as for any other source.
            if exc.errno not in _NO_LINK:
                raise
    _atomic_copy(src, dest, durable=True)


def _atomic_link(src: Path, dest: Path) -> None:
    """Adopt a file the caller hands over: a hard link instead of a copy. For an upload spooled on the
    same disk this skips rewriting every byte, and the fsync only has the spool's own pages to flush
    (measured on 256 MiB: about 0.15 s instead of 2.2 s for copy + fsync)."""
    tmp = dest.parent / f".tmp-{secrets.token_hex(8)}"
    os.link(src, tmp)
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory entry is on disk.
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _atomic_copy(src: Path, dest: Path, *, durable: bool) -> None:
    """Copy ``src`` to ``dest`` so that readers only ever see the old file or the whole new one."""
    try:
        fsrc = open(src, "rb")  # noqa: SIM115 - closed below; opened first to tell "no source" apart
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise _SourceMissing from None
    with fsrc:
        # The temporary file lives next to the destination: same filesystem, so os.replace is atomic.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fdst:
                _copy(fsrc, fdst)
                if durable:
                    fdst.flush()
                    os.fsync(fdst.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    if durable:
        _fsync_dir(dest.parent)


def _copy(fsrc: BinaryIO, fdst: BinaryIO) -> None:
    # sendfile copies inside the kernel; where it cannot do file-to-file (macOS), fall back to a loop.
    offset = 0
    try:
        while sent := os.sendfile(fdst.fileno(), fsrc.fileno(), offset, 1 << 30):
            offset += sent
        return
    except (AttributeError, OSError) as exc:
        if offset or (isinstance(exc, OSError) and exc.errno not in _NO_SENDFILE):
            raise
    shutil.copyfileobj(fsrc, fdst, READ_CHUNK)


_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP, errno.EXDEV}
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOSYS}
