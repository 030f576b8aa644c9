"""How the bytes of a snapshot's disks reach vbfs: the transport interface and the datastore HTTP transport.

A transport reads byte ranges of a disk file on a datastore. :class:`DatastoreHttp` uses the ``/folder`` interface
of vCenter and ESXi (``GET /folder/<path>?dcPath=<datacenter>&dsName=<datastore>`` with a ``Range`` header and the
API session's cookie), which needs no VDDK. It keeps ``streams`` requests in flight on as many keep-alive
connections, retries a failed range a few times (HTTP 5xx, a dropped connection), logs in again on HTTP 401, and
checks that every answer covers exactly the range asked for.

Another transport (an NFC export lease, VDDK) implements the same two methods and is chosen by the plugin.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from vbfs_vmware.session import Session, VmwareError

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class DatastoreFile:
    """``[datastore] path`` in datacenter ``dc_path``."""

    dc_path: str
    datastore: str
    path: str

    @classmethod
    def parse(cls, dc_path: str, name: str) -> DatastoreFile:
        m = re.match(r"^\[([^\]]+)\]\s*(.+)$", name)
        if not m:
            raise VmwareError(f"not a datastore path: {name!r}")
        return cls(dc_path, m.group(1), m.group(2))

    def sibling(self, name: str) -> DatastoreFile:
        folder = self.path.rsplit("/", 1)[0] + "/" if "/" in self.path else ""
        return DatastoreFile(self.dc_path, self.datastore, folder + name)

    def __str__(self) -> str:
        return f"[{self.datastore}] {self.path}"


class Transport(Protocol):
    def read_ranges(self, file: DatastoreFile, ranges: Iterable[tuple[int, int]]) -> Iterator[bytes]:
        """The bytes of each (offset, length), in order; closing the iterator early stops the reads."""
        ...

    def get_file(self, file: DatastoreFile, limit: int) -> bytes | None:
        """A whole small file (``None`` if it does not exist); refuses files larger than ``limit``."""
        ...

    def close(self) -> None: ...


class _Retry(Exception):
    """A failure worth another attempt (server error, dropped connection)."""


class DatastoreHttp:
    """Datastore reads over HTTPS ``/folder`` with several ranges in flight."""

    def __init__(self, session: Session, streams: int = 4, attempts: int = 3, backoff: float = 0.5):
        self.session = session
        self.streams = streams
        self.attempts = attempts
        self.backoff = backoff
        self._local = threading.local()
        self._connections: list[http.client.HTTPSConnection] = []
        self._conn_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="vbfs-vmware-read")

    def _url(self, file: DatastoreFile) -> str:
        return (
            f"/folder/{quote(file.path)}?dcPath={quote(file.dc_path, safe='')}&dsName={quote(file.datastore, safe='')}"
        )

    def _connection(self) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(
                self.session.host, self.session.port, context=self.session.ssl_context, timeout=120
            )
            self._local.conn = conn
            with self._conn_lock:
                self._connections.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _get(self, file: DatastoreFile, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """One GET with the current cookie; on 401 log in again once. Raises _Retry for transient failures."""
        for _ in range(2):
            generation = self.session.generation
            conn = self._connection()
            try:
                conn.request("GET", self._url(file), headers={**headers, "Cookie": self.session.cookie()})
                resp = conn.getresponse()
                body = resp.read()
            except ssl.SSLCertVerificationError as exc:
                self._drop_connection()
                raise VmwareError(f"the TLS certificate of {self.session.where} is not trusted: {exc}") from None
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                raise _Retry(f"connection to {self.session.where} failed: {exc or type(exc).__name__}") from None
            if resp.getheader("Connection", "").lower() == "close":
                self._drop_connection()
            if resp.status == 401:
                self.session.relogin(generation)
                continue
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
        raise VmwareError(f"datastore read of {file} refused: the server does not accept the new session (HTTP 401)")

    def _read_range(self, file: DatastoreFile, offset: int, length: int) -> bytes:
        last = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                status, headers, body = self._get(file, {"Range": f"bytes={offset}-{offset + length - 1}"})
            except _Retry as exc:
                last = str(exc)
                continue
            if status >= 500:
                last = f"HTTP {status} {body[:200].decode('utf-8', 'replace').strip()}"
                continue
            if status == 404:
                raise VmwareError(f"datastore file {file} not found (HTTP 404)")
            if status == 206:
                m = _CONTENT_RANGE.match(headers.get("content-range", ""))
                if not m or int(m.group(1)) != offset or len(body) != int(m.group(2)) - offset + 1:
                    raise VmwareError(
                        f"datastore read of {file} at {offset}: the answer covers {headers.get('content-range')!r},"
                        f" not bytes {offset}-{offset + length - 1}"
                    )
                if len(body) != length:
                    raise VmwareError(
                        f"datastore file {file} ends early: {len(body)} of {length} bytes at offset {offset}"
                    )
                return body
            if status == 200 and offset == 0 and len(body) == length:
                return body  # the whole file was asked for and given
            raise VmwareError(f"datastore read of {file} refused: HTTP {status} (range {offset}+{length})")
        raise VmwareError(f"datastore read of {file} at offset {offset} failed {self.attempts} times: {last}")

    def read_ranges(self, file: DatastoreFile, ranges: Iterable[tuple[int, int]]) -> Iterator[bytes]:
        window: deque[Future[bytes]] = deque()
        todo = iter(ranges)
        depth = self.streams * 2
        try:
            for offset, length in todo:
                window.append(self._pool.submit(self._read_range, file, offset, length))
                if len(window) >= depth:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for fut in window:
                fut.cancel()
            for fut in window:
                if not fut.cancelled():
                    fut.exception()  # wait: no read may outlive the snapshot it reads from

    def get_file(self, file: DatastoreFile, limit: int) -> bytes | None:
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                status, _, body = self._get(file, {})
            except _Retry:
                continue
            if status == 404:
                return None
            if status == 200:
                if len(body) > limit:
                    raise VmwareError(f"datastore file {file} is larger than {limit} bytes")
                return body
            if status < 500:
                raise VmwareError(f"datastore read of {file} refused: HTTP {status}")
        raise VmwareError(f"datastore read of {file} failed {self.attempts} times")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._conn_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
