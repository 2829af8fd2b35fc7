"""LocalStorage.put_file with ``consume``: an upload's spool file is adopted (hard link) instead of
copied; without it the stored blob never aliases the source (a worker's output file may be rewritten)."""

from __future__ import annotations

import os
from pathlib import Path

from comfyfleet.storage.base import blob_key
from comfyfleet.storage.local import LocalStorage

KEY = blob_key("tenant-a", "cd" * 32)


def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store", signing_key=b"k" * 32, public_base_url="http://x")


async def test_consumed_file_is_adopted_not_copied(tmp_path: Path) -> None:
    store = storage(tmp_path)
    src = tmp_path / "spool-1"
    src.write_bytes(b"uploaded bytes")
    await store.put_file(KEY, str(src), "application/octet-stream", consume=True)
    stored = store.local_path(KEY)
    assert os.stat(stored).st_ino == os.stat(src).st_ino  # one inode: no second write of the bytes
    src.unlink()  # what the upload route does next
    assert stored.read_bytes() == b"uploaded bytes"
    # No temporary names are left beside the blob.
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]


async def test_without_consume_the_blob_is_a_copy(tmp_path: Path) -> None:
    store = storage(tmp_path)
    src = tmp_path / "output.png"
    src.write_bytes(b"first")
    await store.put_file(KEY, str(src), "image/png")
    src.write_bytes(b"rewritten in place")
    assert store.local_path(KEY).read_bytes() == b"first"
