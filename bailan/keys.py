"""API keys: the keys file, its reloading reader, and `python -m bailan.keys new NAME [--admin]`.

The file (BAILAN_API_KEYS_FILE) holds one key per line:

    <name> <sha256 hex of the key> [admin]

with `#` comments and blank lines. Only hashes are stored, so the file is no
secret worth stealing; a client sends the key itself (`Authorization: Bearer
<key>`). A job belongs to the key *name* that created it, so a key can be
replaced (new hash, same name) without orphaning its jobs.

Like the rest of bailan/, no torch here and no FastAPI: the API's HTTP side of
this is app/auth.py.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bailan.keys")

# Everyone is this key when no keys file is set (open mode, for local use).
ANONYMOUS = "anonymous"
# Names end up in logs, Redis key names (hashed) and job records: keep them plain.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")
ADMIN_FLAG = "admin"


class KeysFileError(ValueError):
    """The keys file cannot be read or has a line that is not `<name> <sha256 hex> [admin]`."""


@dataclass(frozen=True)
class Principal:
    """Who is asking: the key's name, and whether it sees every job."""

    name: str
    admin: bool = False


OPEN_MODE = Principal(ANONYMOUS, admin=True)  # open mode: one client, who sees what it made (everything)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(text: str, source: str = "keys file") -> dict[str, Principal]:
    """{sha256 hex: Principal} from the file's text; KeysFileError names the first bad line."""
    keys: dict[str, Principal] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source}, line {number}"
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != ADMIN_FLAG):
            raise KeysFileError(f"{where}: expected '<name> <sha256 hex of the key> [admin]'")
        name, digest = parts[0], parts[1].lower()
        if not NAME_PATTERN.match(name):
            raise KeysFileError(f"{where}: key name {name!r} must be 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -)")
        if name == ANONYMOUS:
            raise KeysFileError(f"{where}: the name {ANONYMOUS!r} is reserved for open mode")
        if not HASH_PATTERN.match(digest):
            raise KeysFileError(f"{where}: {digest!r} is not a sha256 hex digest (64 hex digits)")
        if name in names:
            raise KeysFileError(f"{where}: key name {name!r} appears twice")
        if digest in keys:
            raise KeysFileError(f"{where}: this hash is already listed for {keys[digest].name!r}")
        names.add(name)
        keys[digest] = Principal(name, admin=len(parts) == 3)
    return keys


def read_keys(path: Path) -> dict[str, Principal]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"cannot read the keys file {path}: {exc}") from None
    return parse_keys(text, str(path))


class KeyRing:
    """The keys of a keys file, re-read whenever the file changes.

    A change is seen by a stat per lookup (mtime, size, inode: microseconds),
    so adding or revoking a key needs no restart. A file that becomes
    unreadable or invalid keeps the last good keys, with an error in the log:
    a typo must not lock every client out (nor let anyone in).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[str, Principal] = {}
        self._stamp = self._stat()
        self._keys = read_keys(path)  # at start-up a bad file stops the process

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self._keys = read_keys(self.path)
            except KeysFileError as exc:
                log.error("keys file not reloaded, keeping the %d keys read before: %s", len(self._keys), exc)
                return
            log.info("keys file %s reloaded: %d keys", self.path, len(self._keys))

    def lookup(self, key: str) -> Principal | None:
        """The key's Principal, or None. Compared by hash, in constant time."""
        self._refresh()
        digest = hash_key(key)
        found = None
        # Every entry is compared, so the time taken says nothing about which matched.
        for candidate, principal in self._keys.items():
            if hmac.compare_digest(candidate, digest):
                found = principal
        return found

    def __len__(self) -> int:
        return len(self._keys)


def new_key(name: str, admin: bool) -> tuple[str, str]:
    """A fresh random key and its keys-file line."""
    key = "bl_" + secrets.token_urlsafe(32)
    line = f"{name} {hash_key(key)}" + (f" {ADMIN_FLAG}" if admin else "")
    return key, line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bailan.keys", description="Make API keys for BAILAN_API_KEYS_FILE."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="print a fresh key (shown once) and the line to add to the keys file")
    new.add_argument("name", help="the key's name: jobs belong to it; 1-64 of A-Z a-z 0-9 . _ -")
    new.add_argument("--admin", action="store_true", help="this key sees and cancels every job")
    args = parser.parse_args(argv)
    if not NAME_PATTERN.match(args.name) or args.name == ANONYMOUS:
        print(f"invalid key name {args.name!r}: 1-64 of A-Z a-z 0-9 . _ -, not {ANONYMOUS!r}", file=sys.stderr)
        return 2
    key, line = new_key(args.name, args.admin)
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print(f"line for BAILAN_API_KEYS_FILE: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
