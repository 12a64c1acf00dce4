"""Bearer tokens for people and tools: a file in Kubernetes' static-token format, re-read when it changes.

    # token,user,uid,"roles"      (uid is ignored; roles as Kubernetes groups: one, or several in quotes)
    3f9a…c1,alice,1,"viewer,tap"
    77b2…e0,ci-bot,2,editor

Only a SHA-256 of each token is kept: the lookup hashes the presented token, so the table holds nothing
a memory dump could replay, and a lookup costs the same whatever the token.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from etlrouter.security.identity import Identity, token_identity

log = logging.getLogger(__name__)

ROLES = ("viewer", "tap", "editor", "admin")
MAX_TOKEN_FILE_BYTES = 1 << 20


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names file:line."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, origin: str) -> dict[bytes, Identity]:
    table: dict[bytes, Identity] = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        where = f"{origin}:{number}"
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise TokenFileError(f'{where}: expected token,user[,uid[,"roles"]]')
        token, user = row[0].strip(), row[1].strip()
        if len(token) < 16:
            raise TokenFileError(f"{where}: the token of {user!r} is shorter than 16 characters")
        roles = [r.strip() for r in (row[3] if len(row) > 3 else "").split(",") if r.strip()]
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise TokenFileError(f"{where}: unknown role {unknown[0]!r}; expected one of {', '.join(ROLES)}")
        digest = _digest(token)
        if digest in table:
            raise TokenFileError(f"{where}: the token of {user!r} is listed twice")
        table[digest] = token_identity(user, roles)
    return table


@dataclass
class TokenFile:
    """The token table of `path`; `refresh()` re-reads it when its size, mtime or inode changed. A file
    that no longer parses keeps the previous table (and says so), so a bad edit locks no one out."""

    path: Path
    _table: dict[bytes, Identity]
    _signature: tuple[int, int, int]

    @classmethod
    def load(cls, path: str | Path) -> TokenFile:
        p = Path(path)
        table, signature = cls._read(p)
        return cls(p, table, signature)

    @staticmethod
    def _read(path: Path) -> tuple[dict[bytes, Identity], tuple[int, int, int]]:
        try:
            st = os.stat(path)
            if st.st_size > MAX_TOKEN_FILE_BYTES:
                raise TokenFileError(f"{path}: larger than {MAX_TOKEN_FILE_BYTES} bytes")
            text = path.read_text("utf-8")
        except OSError as e:
            raise TokenFileError(f"{path}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise TokenFileError(f"{path}: not UTF-8 text") from None
        return parse_tokens(text, str(path)), (st.st_ino, st.st_size, st.st_mtime_ns)

    def lookup(self, token: str) -> Identity | None:
        return self._table.get(_digest(token))

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when a new table is in use."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            log.warning(
                "token file unreadable; keeping the previous tokens",
                extra={"fields": {"path": str(self.path), "error": str(e)}},
            )
            return False
        if (st.st_ino, st.st_size, st.st_mtime_ns) == self._signature:
            return False
        try:
            self._table, self._signature = self._read(self.path)
        except TokenFileError as e:
            self._signature = (st.st_ino, st.st_size, st.st_mtime_ns)  # warn once per bad version
            log.warning(
                "token file invalid; keeping the previous tokens", extra={"fields": {"error": str(e)}}
            )
            return False
        log.info(
            "token file reloaded", extra={"fields": {"path": str(self.path), "tokens": len(self._table)}}
        )
        return True
