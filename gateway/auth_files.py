"""The auth files behind `gateway.auth`: loaded at start, reloaded when they change.

`--auth-tokens FILE` and `--auth-jwt-key FILE` are read once at start (a bad file stops
the gateway with a clear error). Afterwards a request that needs a decision looks at the
files' status at most once a second (`stat`, no background loop); when one changed, or on
SIGHUP, they are read again in a worker thread and the new `Authorizer` replaces the old
one in a single assignment. A file that became invalid is logged and the previous tables
are kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from ds_cluster.gateway.auth import (
    AuthConfigError,
    Authorizer,
    JwtKeys,
    TokenTable,
    parse_jwt_keys,
    parse_tokens,
)

log = logging.getLogger(__name__)
CHECK_INTERVAL = 1.0  # seconds between looks at the files' status
MAX_FILE_BYTES = 16 * 1024 * 1024
T = TypeVar("T")


def _status(path: Path | None) -> tuple[int, int, int, int] | None:
    """What tells a changed file apart (inode, size, mtime, ctime); None without one."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0, 0)  # missing now: read (and fail) on the next load
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _parse(path: Path, what: str, parse: Callable[[bytes], T]) -> T:
    """`parse` of the file's bytes; AuthConfigError names the option and the file."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise AuthConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise AuthConfigError(f"{what} {path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return parse(data)
    except AuthConfigError as exc:
        raise AuthConfigError(f"{what} {path}: {exc}") from None


@dataclass(frozen=True)
class _Loaded:
    authorizer: Authorizer
    status: tuple[tuple[int, int, int, int] | None, ...]


def load(tokens_path: Path | None, jwt_key_path: Path | None) -> _Loaded:
    """Read and check both files. Raises AuthConfigError naming the file and the problem."""
    status = (_status(tokens_path), _status(jwt_key_path))  # before reading: no lost update
    tokens: TokenTable | None = None
    keys: JwtKeys | None = None
    if tokens_path is not None:
        tokens = _parse(tokens_path, "--auth-tokens", parse_tokens)
    if jwt_key_path is not None:
        keys = _parse(jwt_key_path, "--auth-jwt-key", parse_jwt_keys)
    return _Loaded(Authorizer(tokens, keys), status)


class AuthFiles:
    """The current `Authorizer`, kept in step with its files."""

    def __init__(
        self,
        tokens_path: Path | None,
        jwt_key_path: Path | None,
        *,
        protect_metrics: bool = False,
    ) -> None:
        """Loads both files now: raises AuthConfigError when either is unusable."""
        if tokens_path is None and jwt_key_path is None:
            raise ValueError("AuthFiles needs a tokens file or a JWT key")
        self.tokens_path = tokens_path
        self.jwt_key_path = jwt_key_path
        self.protect_metrics = protect_metrics
        loaded = load(tokens_path, jwt_key_path)
        self.authorizer = loaded.authorizer
        self._status = loaded.status
        self._checked_at = time.monotonic()
        self._nursery: trio.Nursery | None = None
        self._reloading = False

    def start(self, nursery: trio.Nursery) -> None:
        """Where reloads run (the gateway's lifetime nursery); until then none happen."""
        self._nursery = nursery

    def current(self) -> Authorizer:
        """The authorizer to decide with now. At most once a second this also looks at the
        files and, if one changed, starts a reload (the request goes on with this one)."""
        now = time.monotonic()
        if now - self._checked_at >= CHECK_INTERVAL:
            self._checked_at = now
            status = (_status(self.tokens_path), _status(self.jwt_key_path))
            if status != self._status:
                self.reload_soon()
        return self.authorizer

    def reload_soon(self) -> None:
        """Start a reload in the background (SIGHUP, a changed file), unless one runs."""
        if not self._reloading and self._nursery is not None:
            self._reloading = True
            self._nursery.start_soon(self._reload_task)

    async def reload(self) -> bool:
        """Read the files again (SIGHUP); keep the current tables if they are invalid.
        True when the new tables are in use."""
        try:
            loaded = await trio.to_thread.run_sync(load, self.tokens_path, self.jwt_key_path)
        except AuthConfigError as exc:
            log.error("auth files not reloaded, the previous ones stay in use: %s", exc)
            # Not retried until the files change again.
            self._status = (_status(self.tokens_path), _status(self.jwt_key_path))
            return False
        self.authorizer = loaded.authorizer
        self._status = loaded.status
        log.info("auth files reloaded (%s)", self.describe())
        return True

    async def _reload_task(self) -> None:
        try:
            await self.reload()
        finally:
            self._reloading = False

    def describe(self) -> str:
        parts = []
        if self.authorizer.tokens is not None:
            parts.append(f"{len(self.authorizer.tokens)} tokens")
        if self.authorizer.jwt_keys is not None:
            parts.append(f"{len(self.authorizer.jwt_keys)} JWT key(s)")
        return ", ".join(parts)


def from_args(tokens: str | None, jwt_key: str | None, protect_metrics: bool) -> AuthFiles | None:
    """The gateway's auth from its options; None when auth is off (neither file given)."""
    if not tokens and not jwt_key:
        if protect_metrics:
            raise AuthConfigError("--auth-metrics needs --auth-tokens or --auth-jwt-key")
        return None
    return AuthFiles(
        Path(tokens) if tokens else None,
        Path(jwt_key) if jwt_key else None,
        protect_metrics=protect_metrics,
    )
