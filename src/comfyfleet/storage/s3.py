"""Blobs in an S3-compatible bucket (AWS, R2, SeaweedFS, MinIO) through boto3.

boto3 blocks, so every call runs on a small thread pool owned by the backend rather than on asyncio's
default executor: a few long multipart uploads must not starve the rest of the process of threads.
Nothing here holds a whole blob in memory: uploads and downloads go file-to-socket through boto3's
managed transfer, reads stream in ``READ_CHUNK`` pieces.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from comfyfleet.storage.base import (
    BlobNotFound,
    SignedUrl,
    StorageError,
    check_content_type,
    check_range,
    content_disposition,
    validate_key,
)

if TYPE_CHECKING:
    # Typed when the optional mypy-boto3-s3 stubs are installed, Any otherwise.
    from mypy_boto3_s3 import S3Client

P = ParamSpec("P")
T = TypeVar("T")

MiB = 1 << 20
READ_CHUNK = MiB
# SigV4 presigned URLs cannot outlive a week.
MAX_URL_LIFETIME_S = 7 * 24 * 3600
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# Regions that must not be sent as a LocationConstraint: us-east-1 is S3's implicit default and
# "auto" is the placeholder R2 and some gateways use.
_IMPLICIT_REGIONS = frozenset({"", "us-east-1", "auto"})


class S3Storage:
    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
        multipart_threshold: int = 64 * MiB,
        multipart_chunk: int = 16 * MiB,
        addressing_style: Literal["auto", "path", "virtual"] = "auto",
        max_concurrency: int = 4,
        io_threads: int = 16,
        max_attempts: int = 4,
        public_endpoint_url: str | None = None,
    ) -> None:
        """``public_endpoint_url``: where clients reach the store, when it differs from where this
        process does (e.g. ``http://seaweedfs:8333`` inside compose vs ``http://localhost:8333``);
        presigned URLs are signed for that host. ``max_concurrency``: parallel parts per transfer; a
        transfer buffers at most about ``multipart_chunk * max_concurrency`` bytes."""
        self.bucket = bucket
        self._region = region
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # One connection per concurrent part across a few simultaneous transfers.
            max_pool_connections=max(10, io_threads, max_concurrency * 2),
        )
        client_args: dict[str, Any] = {
            # None keys let boto3 use its usual chain (env, profile, instance role).
            "aws_access_key_id": access_key_id or None,
            "aws_secret_access_key": secret_access_key or None,
            "region_name": region or None,
            "config": config,
        }
        self._client = _new_client(endpoint_url=endpoint_url, **client_args)
        self._presign_client = (
            _new_client(endpoint_url=public_endpoint_url, **client_args)
            if public_endpoint_url
            else self._client
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunk,
            max_concurrency=max_concurrency,
            use_threads=True,
        )
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="s3-storage")

    async def _run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        # Cancelling the awaiting task does not stop the thread: an upload in flight finishes anyway.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def close(self) -> None:
        await self._run(self._client.close)
        if self._presign_client is not self._client:
            self._presign_client.close()
        self._pool.shutdown(wait=False)

    # -- bucket ------------------------------------------------------------------------------------

    async def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (idempotent; meant for start-up and dev setups)."""
        with _translate("head bucket", self.bucket):
            try:
                await self._run(self._client.head_bucket, Bucket=self.bucket)
                return
            except ClientError as exc:
                if _error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                    raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self._region not in _IMPLICIT_REGIONS:
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
            try:
                await self._run(self._client.create_bucket, **kwargs)
            except ClientError as exc:
                # Lost a race with another process creating it: the outcome is the same.
                if _error_code(exc) != "BucketAlreadyOwnedByYou":
                    raise

    # -- blobs -------------------------------------------------------------------------------------

    async def put_file(self, key: str, path: str, content_type: str, *, consume: bool = False) -> None:
        # ``consume`` changes nothing here: the upload reads the file either way.
        validate_key(key)
        with _translate("put", key):
            # upload_file switches to a parallel multipart upload above multipart_threshold.
            await self._run(
                self._client.upload_file,
                path,
                self.bucket,
                key,
                ExtraArgs={"ContentType": content_type},
                Config=self._transfer,
            )

    async def exists(self, key: str) -> bool:
        try:
            await self.size(key)
        except BlobNotFound:
            return False
        return True

    async def size(self, key: str) -> int:
        validate_key(key)
        with _translate("head", key):
            head = await self._run(self._client.head_object, Bucket=self.bucket, Key=key)
        return int(head["ContentLength"])

    async def delete(self, key: str) -> None:
        validate_key(key)
        try:
            with _translate("delete", key):
                await self._run(self._client.delete_object, Bucket=self.bucket, Key=key)
        except BlobNotFound:
            # S3 answers 204 for a missing key; some compatible stores say NoSuchKey instead.
            return

    async def open_read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        check_range(start, end)
        validate_key(key)
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start or end is not None:
            params["Range"] = f"bytes={start}-{'' if end is None else end}"
        with _translate("get", key):
            try:
                response = await self._run(self._client.get_object, **params)
            except ClientError as exc:
                if _error_code(exc) == "InvalidRange":
                    return  # start at or past the end: nothing to read, as on the local backend
                raise
        body = response["Body"]
        try:
            while True:
                with _translate("read", key):
                    chunk = await self._run(body.read, READ_CHUNK)
                if not chunk:
                    return
                yield chunk
        finally:
            # Closing early drops the connection instead of draining the rest of a large object.
            body.close()

    async def get_to_file(self, key: str, path: str) -> None:
        validate_key(key)
        with _translate("download", key):
            # download_file writes a temporary sibling and renames it: no partial file at ``path``.
            await self._run(self._client.download_file, self.bucket, key, path, Config=self._transfer)

    async def download_url(self, key: str, *, filename: str, content_type: str, lifetime_s: int) -> SignedUrl:
        validate_key(key)
        if not 0 < lifetime_s <= MAX_URL_LIFETIME_S:
            raise ValueError(f"lifetime_s must be in 1..{MAX_URL_LIFETIME_S}")
        check_content_type(content_type)
        expires_at = datetime.fromtimestamp(int(time.time()) + lifetime_s, UTC)
        with _translate("presign", key):
            # A worker thread because resolving credentials may hit the network (instance metadata).
            url = await self._run(
                self._presign_client.generate_presigned_url,
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": key,
                    "ResponseContentDisposition": content_disposition(filename),
                    "ResponseContentType": content_type,
                },
                ExpiresIn=lifetime_s,
            )
        return SignedUrl(url=url, expires_at=expires_at)


_session_lock = threading.Lock()


@functools.cache
def _shared_session() -> boto3.session.Session:
    return boto3.session.Session()


def _new_client(**kwargs: Any) -> S3Client:
    # A session caches the parsed S3 service model: a client from a shared session takes milliseconds,
    # one from a fresh session a few hundred. Sessions are not thread-safe, hence the lock.
    with _session_lock:
        client: S3Client = _shared_session().client("s3", **kwargs)
        return client


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def _translate(op: str, key: str) -> Iterator[None]:
    """boto3's many exception types become the two the rest of the service knows."""
    try:
        yield
    except ClientError as exc:
        if _error_code(exc) in _NOT_FOUND_CODES:
            raise BlobNotFound(key) from exc
        raise StorageError(f"s3 {op} {key!r} failed: {exc}") from exc
    except (BotoCoreError, Boto3Error, OSError) as exc:
        raise StorageError(f"s3 {op} {key!r} failed: {exc}") from exc
