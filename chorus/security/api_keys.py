"""API keys of the gateway's client port, from a file that may change while it runs.

The file holds one key a line, `<key id>:<secret>`, with `#` comments and blank lines
ignored. The key id names the key in logs, traces and limits; the secret never leaves
this module. In Kubernetes the file is a key of a Secret mounted as a volume: the
kubelet rotates it by swapping a symlink, so the file is re-read whenever the path
resolves to a different file or the file's size or mtime changes, checked on every
lookup (one stat). A rotation takes effect with the next call, without a restart.

A file that becomes unreadable or malformed while running keeps the keys last read
(a broken rotation must not lock every client out) and says so in the log; at start
it is a configuration error.

Secrets are compared as SHA-256 digests with `hmac.compare_digest`, against every key
with no early exit, so the time a lookup takes tells nothing about how close a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_SECRET_CHARS = 16


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def parse_keys(text: str, source: str) -> list[tuple[str, bytes]]:
    """(key id, digest of the secret) for each key line; ValueError naming the line."""
    keys: list[tuple[str, bytes]] = []
    ids: set[str] = set()
    digests: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, sep, secret = line.partition(":")
        key_id, secret = key_id.strip(), secret.strip()
        where = f"{source} line {number}"
        if not sep:
            raise ValueError(f"{where}: expected `<key id>:<secret>`")
        if not KEY_ID.fullmatch(key_id):
            raise ValueError(f"{where}: key id {key_id[:70]!r} must be 1-64 letters, digits or ._@- ")
        if len(secret) < MIN_SECRET_CHARS or any(c.isspace() for c in secret):
            raise ValueError(f"{where}: the secret of {key_id} must be at least {MIN_SECRET_CHARS} "
                             "characters with no spaces")
        digest = _digest(secret)
        if key_id in ids:
            raise ValueError(f"{where}: key id {key_id} appears twice")
        if digest in digests:
            raise ValueError(f"{where}: the secret of {key_id} is also another key's secret")
        ids.add(key_id)
        digests.add(digest)
        keys.append((key_id, digest))
    return keys


class ApiKeys:
    """The keys in `path`, re-read when the file changes. Call on the event loop."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._keys: list[tuple[str, bytes]] = []
        self._seen: tuple[int, ...] | None = None
        try:
            self._seen = self._signature()
            self._keys = self._read()
        except OSError as err:
            raise ValueError(f"API keys file {self.path}: {err.strerror or err}") from None
        self._announce()

    @property
    def key_ids(self) -> tuple[str, ...]:
        self._refresh()
        return tuple(key_id for key_id, _ in self._keys)

    def lookup(self, secret: str) -> str | None:
        """The id of the key whose secret this is, or None."""
        self._refresh()
        digest = _digest(secret)
        found = None
        for key_id, known in self._keys:
            if hmac.compare_digest(known, digest):
                found = key_id
        return found

    def _signature(self) -> tuple[int, ...]:
        st = os.stat(self.path)  # follows the Secret volume's symlinks
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> list[tuple[str, bytes]]:
        return parse_keys(self.path.read_text(encoding="utf-8"), str(self.path))

    def _refresh(self) -> None:
        try:
            signature = self._signature()
        except OSError as err:
            if self._seen is not None:
                log.error("API keys file %s cannot be read (%s); keeping the %d keys read before",
                          self.path, err.strerror or err, len(self._keys))
                self._seen = None
            return
        if signature == self._seen:
            return
        self._seen = signature
        try:
            self._keys = self._read()
        except (OSError, UnicodeDecodeError, ValueError) as err:
            log.error("API keys file %s changed but cannot be used (%s); keeping the %d keys read before",
                      self.path, err, len(self._keys))
            return
        self._announce()

    def _announce(self) -> None:
        ids = ", ".join(key_id for key_id, _ in self._keys)
        if self._keys:
            log.info("API keys from %s: %s", self.path, ids)
        else:
            log.warning("API keys file %s has no keys: every call that needs a key is refused", self.path)
