"""Where image bytes live: a blob store beside Redis, so Redis keeps only records.

The worker puts each job's final images and previews here; the API reads them
back. Redis holds a few hundred bytes of record per job instead of the images
themselves (megabytes under `noeviction`, for a day).

`BlobStore` is the whole interface: put/get/delete by key, each blob with its
own expiry, and a `sweep` that removes what expired. `DirBlobStore` keeps blobs
as files under one directory, which every API and worker process must see (one
host, or a shared volume: README, "Scaling out"). An S3-compatible store would
implement the same four methods (expiry as an object lifecycle rule or a tag).

Like the rest of bailan/, no torch here.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Protocol

log = logging.getLogger("bailan.blobs")

# A key is "<job id>/<name>": lowercase letters, digits, dashes and dots, no
# "..": keys map straight onto paths, so nothing may climb out of the root.
_KEY = re.compile(r"^[0-9a-z]{2,64}/[0-9a-z][0-9a-z.-]{0,63}$")
_TMP_PREFIX = ".tmp-"
_FAN = re.compile(r"^[0-9a-z]{2}$")
# A temporary file this old is a write that died half-way.
_STALE_TMP_S = 3600.0


def image_key(job_id: str, index: int) -> str:
    """Final image `index` of a job."""
    return f"{job_id}/image-{index}"


def preview_key(job_id: str, step: int) -> str:
    """The preview taken after `step`."""
    return f"{job_id}/preview-{step}"


class BlobStore(Protocol):
    """Bytes by key, each with an expiry. Implementations must be safe across processes and hosts."""

    def put(self, key: str, data: bytes, ttl_s: float) -> None:
        """Store `data` under `key` (replacing it) until `ttl_s` seconds from now."""
        ...

    def get(self, key: str) -> bytes | None:
        """The bytes under `key`, or None when absent or expired (even if not swept yet)."""
        ...

    def delete(self, key: str) -> None:
        """Remove `key`; absent is fine."""
        ...

    def sweep(self, now: float | None = None) -> int:
        """Remove every blob expired at `now` (default: the clock); returns how many."""
        ...


class DirBlobStore:
    """Blobs as files: `<root>/<first 2 chars of job id>/<job id>/<name>`.

    A file's modification time *is* its expiry: set when it is written, read on
    every get, so no index is needed and the sweep is a walk that compares one
    stat per file. Writes go to a temporary file renamed into place, so a
    reader on any host sees the old blob or the whole new one, never a part.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key) or ".." in key:
            raise ValueError(f"invalid blob key {key!r}")
        return self.root / key[:2] / key

    def put(self, key: str, data: bytes, ttl_s: float) -> None:
        path = self._path(key)
        tmp = path.parent / f"{_TMP_PREFIX}{path.name}-{secrets.token_hex(4)}"
        try:
            # Twice: a sweep may remove the directory, empty, between mkdir and open.
            for attempt in range(2):
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    out = open(tmp, "wb")
                    break
                except FileNotFoundError:
                    if attempt:
                        raise
            with out:
                out.write(data)
            expires = time.time() + ttl_s
            os.utime(tmp, (expires, expires))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as blob:
                if os.fstat(blob.fileno()).st_mtime <= time.time():
                    return None
                return blob.read()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def sweep(self, now: float | None = None) -> int:
        """Walk the tree; remove expired files, stale temporaries and the directories they leave empty.

        Every API process runs this (bailan.reaper.Reaper); two at once only
        race to unlink the same file, which both survive.
        """
        now = time.time() if now is None else now
        removed = 0
        for fan in _subdirs(self.root):
            # Only the store's own layout: a root given wrongly (the checkout, a home directory)
            # must lose nothing (fan = the job id's first 2 characters; names as keys allow).
            for job in _subdirs(fan.path):
                if not (_KEY.match(f"{job.name}/x") and job.name[:2] == fan.name):
                    continue
                for entry in _entries(job.path):
                    if not (_KEY.match(f"{job.name}/{entry.name}") or entry.name.startswith(_TMP_PREFIX)):
                        continue
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        mtime = entry.stat(follow_symlinks=False).st_mtime
                        stale = mtime < now - _STALE_TMP_S if entry.name.startswith(_TMP_PREFIX) else mtime <= now
                        if stale:
                            os.unlink(entry.path)
                            removed += 1
                    except FileNotFoundError:
                        continue
                _rmdir_if_empty(job.path)
            if _FAN.match(fan.name):
                _rmdir_if_empty(fan.path)
        return removed


def _entries(path: str | Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _subdirs(path: str | Path) -> list[os.DirEntry[str]]:
    return [entry for entry in _entries(path) if entry.is_dir(follow_symlinks=False)]


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty (or a writer just put a blob there): kept


def open_store(blob_dir: Path | str) -> BlobStore:
    """The store the settings name. One implementation today; an S3 URL would pick another."""
    return DirBlobStore(blob_dir)
