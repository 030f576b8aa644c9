"""A small NBD client in pure Python: what a pull-mode backup needs from QEMU's NBD server, and nothing else.

It speaks the fixed-newstyle handshake with structured replies (``NBD_OPT_STRUCTURED_REPLY``), selects metadata
contexts (``base:allocation`` and ``qemu:dirty-bitmap:<name>``) with ``NBD_OPT_SET_META_CONTEXT``, opens the export
with ``NBD_OPT_GO``, and then issues ``NBD_CMD_READ`` and ``NBD_CMD_BLOCK_STATUS`` over a Unix or TCP socket.
Reads are pipelined: :meth:`NbdClient.read_ranges` keeps several requests on the wire and assembles the structured
reply chunks (data, holes, errors) of each. The export is opened read-only in spirit: no write command exists here.

Every protocol violation or server error is an :class:`NbdError` with one sentence. The protocol is described in
the NBD project's ``doc/proto.md``; the constants below are its.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vbfs.errors import SourceError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERROR_BIT = 1 << 31

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_DISC = 2
CMD_BLOCK_STATUS = 7
CMD_FLAG_DF = 1 << 2

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15

STATE_HOLE = 1 << 0  # base:allocation: not allocated
STATE_ZERO = 1 << 1  # base:allocation: reads as zeros
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:<name>: changed since the bitmap was created

BASE_ALLOCATION = "base:allocation"
MAX_REQUEST = 32 * 1024 * 1024  # QEMU's largest payload; NBD_INFO_BLOCK_SIZE may say less
MAX_STATUS_SPAN = 1 << 30  # ask for block status of at most 1 GiB at a time

_ERRNO = {
    1: "EPERM",
    5: "EIO",
    12: "ENOMEM",
    22: "EINVAL",
    28: "ENOSPC",
    75: "EOVERFLOW",
    95: "ENOTSUP",
    108: "ESHUTDOWN",
}


class NbdError(SourceError):
    """The NBD server refused something or broke the protocol."""


@dataclass(frozen=True)
class StatusExtent:
    offset: int
    length: int
    flags: int


class NbdClient:
    """One NBD connection to one export."""

    def __init__(
        self,
        export: str,
        unix_path: str | None = None,
        host: str | None = None,
        port: int = 10809,
        meta_contexts: Iterable[str] = (),
        timeout: float = 120.0,
        window: int = 8,
    ):
        self.export = export
        self.where = unix_path or f"{host}:{port}"
        self.window = window
        if unix_path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = unix_path
        else:
            self.sock = socket.socket(socket.AF_INET6 if host and ":" in host else socket.AF_INET)
            target = (host or "127.0.0.1", port)
        self.sock.settimeout(timeout)
        self.size = 0
        self.max_request = MAX_REQUEST
        self.contexts: dict[str, int] = {}
        self._handle = 0
        try:
            self.sock.connect(target)
            self._handshake(list(meta_contexts))
        except OSError as exc:
            self.sock.close()
            raise NbdError(f"NBD server at {self.where}: {exc.strerror or exc}") from None
        except BaseException:
            self.sock.close()
            raise

    # ---- plumbing ------------------------------------------------------------------------------------------------

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(min(n - len(buf), 4 * 1024 * 1024))
            if not part:
                raise NbdError(f"NBD server at {self.where} closed the connection")
            buf += part
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        while len(view):
            n = self.sock.recv_into(view)
            if n == 0:
                raise NbdError(f"NBD server at {self.where} closed the connection")
            view = view[n:]

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, kind, length = struct.unpack(">QIII", self._recv(20))
        if magic != OPT_REPLY_MAGIC or opt != option:
            raise NbdError(f"NBD server at {self.where} sent a bad option reply")
        return kind, self._recv(length)

    def _option_error(self, what: str, kind: int, data: bytes) -> NbdError:
        text = data.decode("utf-8", "replace").strip()
        return NbdError(f"NBD server at {self.where} refused {what}" + (f": {text}" if text else f" (reply {kind:#x})"))

    # ---- handshake -----------------------------------------------------------------------------------------------

    def _handshake(self, meta_contexts: list[str]) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdError(f"{self.where} is not a newstyle NBD server")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError(f"NBD server at {self.where} does not speak fixed newstyle")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))

        self._send_option(OPT_STRUCTURED_REPLY)
        kind, data = self._option_reply(OPT_STRUCTURED_REPLY)
        if kind != REP_ACK:
            raise self._option_error("structured replies", kind, data)

        if meta_contexts:
            name = self.export.encode()
            payload = struct.pack(">I", len(name)) + name + struct.pack(">I", len(meta_contexts))
            for ctx in meta_contexts:
                payload += struct.pack(">I", len(ctx.encode())) + ctx.encode()
            self._send_option(OPT_SET_META_CONTEXT, payload)
            while True:
                kind, data = self._option_reply(OPT_SET_META_CONTEXT)
                if kind == REP_ACK:
                    break
                if kind != REP_META_CONTEXT:
                    raise self._option_error(f"metadata contexts {meta_contexts}", kind, data)
                (ctx_id,) = struct.unpack(">I", data[:4])
                self.contexts[data[4:].decode()] = ctx_id
            missing = [c for c in meta_contexts if c not in self.contexts]
            if missing:
                raise NbdError(f"NBD export {self.export!r} at {self.where} has no metadata context {missing[0]!r}")

        name = self.export.encode()
        self._send_option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
        while True:
            kind, data = self._option_reply(OPT_GO)
            if kind == REP_ACK:
                break
            if kind & REP_ERROR_BIT:
                raise self._option_error(f"export {self.export!r}", kind, data)
            if kind == REP_INFO and len(data) >= 2:
                (info,) = struct.unpack(">H", data[:2])
                if info == INFO_EXPORT:
                    self.size, _ = struct.unpack(">QH", data[2:12])
                elif info == INFO_BLOCK_SIZE:
                    _, _, maximum = struct.unpack(">III", data[2:14])
                    self.max_request = min(MAX_REQUEST, maximum)

    # ---- transmission --------------------------------------------------------------------------------------------

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0) -> int:
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self._handle, offset, length))
        return self._handle

    def _chunk(self) -> tuple[int, int, int, bytes | None, int]:
        """One reply or reply chunk: (handle, type, flags, payload, error). Read payloads are left on the wire."""
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self._recv(12))
            return handle, -1, REPLY_FLAG_DONE, None, error
        if magic != STRUCTURED_REPLY_MAGIC:
            raise NbdError(f"NBD server at {self.where} sent a reply with bad magic {magic:#x}")
        flags, kind, handle, length = struct.unpack(">HHQI", self._recv(16))
        if kind == REPLY_TYPE_OFFSET_DATA:
            return handle, kind, flags, None, length  # the caller reads offset and data
        payload = self._recv(length)
        if kind & REPLY_TYPE_ERROR_BIT:
            error, msg_len = struct.unpack(">IH", payload[:6])
            message = payload[6 : 6 + msg_len].decode("utf-8", "replace")
            raise NbdError(
                f"NBD server at {self.where}: {_ERRNO.get(error, f'error {error}')}"
                + (f": {message}" if message else "")
            )
        return handle, kind, flags, payload, 0

    def _read_reply(self, pending: dict[int, tuple[int, int, bytearray]]) -> int:
        """Take one chunk off the wire into its request's buffer; return the handle whose reply is complete, or 0."""
        handle, kind, flags, payload, extra = self._chunk()
        if handle not in pending:
            raise NbdError(f"NBD server at {self.where} answered a request that was not asked")
        offset, length, buf = pending[handle]
        if kind == -1:  # simple reply: the data follows unless there is an error
            if extra:
                raise NbdError(f"NBD read at {offset} from {self.where}: {_ERRNO.get(extra, f'error {extra}')}")
            self._recv_into(memoryview(buf))
            return handle
        if kind == REPLY_TYPE_OFFSET_DATA:
            (at,) = struct.unpack(">Q", self._recv(8))
            n = extra - 8
            if at < offset or at + n > offset + length:
                raise NbdError(f"NBD server at {self.where} sent data outside the range asked for")
            self._recv_into(memoryview(buf)[at - offset : at - offset + n])
        elif kind == REPLY_TYPE_OFFSET_HOLE:
            assert payload is not None
            at, n = struct.unpack(">QI", payload[:12])
            if at < offset or at + n > offset + length:
                raise NbdError(f"NBD server at {self.where} sent a hole outside the range asked for")
            buf[at - offset : at - offset + n] = bytes(n)  # the buffer may be reused: holes are written as zeros
        elif kind != REPLY_TYPE_NONE:
            raise NbdError(f"NBD server at {self.where} sent reply chunk type {kind} to a read")
        return handle if flags & REPLY_FLAG_DONE else 0

    def read_ranges(self, ranges: Iterable[tuple[int, int]]) -> Iterator[bytes]:
        """The bytes of each (offset, length), in order, with up to ``window`` requests in flight."""
        pending: dict[int, tuple[int, int, bytearray]] = {}
        order: deque[tuple[int, list[int]]] = deque()  # (length, handles of its pieces)
        done: set[int] = set()
        todo = iter(ranges)
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.window:
                nxt = next(todo, None)
                if nxt is None:
                    exhausted = True
                    break
                offset, length = nxt
                if offset < 0 or length < 0 or offset + length > self.size:
                    raise NbdError(f"read of {length} bytes at {offset} is outside the export ({self.size} bytes)")
                handles = []
                for at in range(offset, offset + length, self.max_request):
                    n = min(self.max_request, offset + length - at)
                    h = self._request(CMD_READ, at, n)
                    pending[h] = (at, n, bytearray(n))
                    handles.append(h)
                order.append((length, handles))
            if not order:
                return
            length, handles = order[0]
            while not all(h in done for h in handles):
                finished = self._read_reply(pending)
                if finished:
                    done.add(finished)
            order.popleft()
            data = b"".join(bytes(pending.pop(h)[2]) for h in handles)
            done.difference_update(handles)
            yield data

    def read(self, offset: int, length: int) -> bytes:
        (data,) = self.read_ranges([(offset, length)])
        return data

    def block_status(self, context: str, offset: int = 0, length: int | None = None) -> Iterator[StatusExtent]:
        """Status extents of ``context`` from ``offset`` for ``length`` bytes (to the end by default), in order."""
        ctx_id = self.contexts.get(context)
        if ctx_id is None:
            raise NbdError(f"metadata context {context!r} was not negotiated")
        end = self.size if length is None else min(self.size, offset + length)
        pos = offset
        while pos < end:
            span = min(end - pos, MAX_STATUS_SPAN)
            handle = self._request(CMD_BLOCK_STATUS, pos, span)
            got: list[StatusExtent] = []
            while True:
                h, kind, flags, payload, _ = self._chunk()
                if h != handle:
                    raise NbdError(f"NBD server at {self.where} answered a request that was not asked")
                if kind == REPLY_TYPE_BLOCK_STATUS:
                    assert payload is not None
                    (cid,) = struct.unpack(">I", payload[:4])
                    if cid == ctx_id:
                        at = pos
                        for i in range(4, len(payload) - 7, 8):
                            n, status = struct.unpack(">II", payload[i : i + 8])
                            got.append(StatusExtent(at, n, status))
                            at += n
                elif kind == -1:
                    raise NbdError(f"NBD server at {self.where} does not support block status")
                if flags & REPLY_FLAG_DONE:
                    break
            if not got:
                raise NbdError(f"NBD server at {self.where} gave no block status at offset {pos}")
            for e in got:
                clipped = min(e.length, end - e.offset)
                if clipped > 0:
                    yield StatusExtent(e.offset, clipped, e.flags)
            pos = min(end, got[-1].offset + got[-1].length)

    def close(self) -> None:
        try:
            self._request(CMD_DISC, 0, 0)
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
