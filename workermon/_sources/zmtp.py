"""A ZMTP 3.0 subscriber on plain sockets: Dynamo's ZMQ event plane, in bounded memory.

Why not libzmq's SUB socket: libzmq bounds the size of one *frame*
(``ZMQ_MAXMSGSIZE``), but delivers a multi-frame message only once all of it
has arrived, so a single message of many frames from a broken or hostile
publisher is held whole in memory (300 MB of frames took +288 MB here).  This
reader checks each frame's header as it arrives: a frame over its limit, or a
fifth frame, is read past without being kept, and the message is reported
malformed.  What one connection can hold is therefore one receive chunk plus
one message within the limits (``max_message_bytes``).

Scope: what Dynamo's publishers (libzmq 4.3 PUB/XPUB sockets) speak to a
subscriber — ZMTP 3.0 with the NULL mechanism, a ``READY`` command naming the
socket types, a subscription message (``0x01`` + prefix), then 4-frame
messages; ``PING`` is answered with ``PONG``.  Connections are retried with
back-off (100 ms doubling to 2 s) until the endpoint is disconnected.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from typing import Dict, List, Optional, Tuple

__all__ = ["FRAMES", "Subscriber", "parse_endpoint"]

FRAMES = 4  # topic, publisher id, sequence, header + envelope
_SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
_GREETING = _SIGNATURE + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
_SMALL_FRAME = 4096  # frames 0-2 (topic, two 8-byte ids) and commands
_CHUNK = 65536
_READ_PER_POLL = 4 * _CHUNK  # per connection and poll: one busy publisher cannot starve the others
_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04


def _frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) <= 255:
        return bytes((flags, len(body))) + body
    return bytes((flags | _LONG,)) + len(body).to_bytes(8, "big") + body


def _command(name: bytes, data: bytes = b"") -> bytes:
    return _frame(bytes((len(name),)) + name + data, _COMMAND)


def _property(name: bytes, value: bytes) -> bytes:
    return bytes((len(name),)) + name + len(value).to_bytes(4, "big") + value


_READY = _command(b"READY", _property(b"Socket-Type", b"SUB"))


def parse_endpoint(endpoint: str) -> Tuple[str, int]:
    """``tcp://host:port`` (``[v6]`` allowed) → (host, port); ValueError otherwise."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"not a tcp:// endpoint: {endpoint[:100]!r}")
    host, sep, port = endpoint[6:].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a tcp://host:port endpoint: {endpoint[:100]!r}")
    return host.strip("[]"), int(port)


class _Peer:
    __slots__ = ("endpoint", "address", "sock", "state", "buf", "frames", "nframes", "bad", "skip", "more",
                 "delay", "retry_at")

    def __init__(self, endpoint: str, address: Tuple[str, int]) -> None:
        self.endpoint = endpoint
        self.address = address
        self.sock: Optional[socket.socket] = None
        self.state = "idle"  # idle → connecting → greeting → handshake → ready
        self.buf = bytearray()
        self.frames: List[bytes] = []
        self.nframes = 0
        self.bad: Optional[str] = None
        self.skip = 0
        self.more = False
        self.delay = 0.1
        self.retry_at = 0.0

    def reset_message(self) -> None:
        self.frames = []
        self.nframes = 0
        self.bad = None
        self.more = False


class Subscriber:
    """Connections to publishers, one subscription prefix, and the messages they send.

    Single-threaded: every method runs on the thread that owns it.
    :meth:`poll` waits (bounded by ``timeout`` and by the next retry) for
    data on any connection or on ``waker``, and returns the complete,
    well-framed messages (lists of 4 frames) and the reasons of the
    malformed ones it read past.
    """

    def __init__(self, subscription: bytes, max_payload: int) -> None:
        self.subscription = subscription
        # Frame 3 carries a version byte, a 4-byte length and the envelope:
        # longer than this is "oversized" (the parser's own limit).
        self.max_last_frame = max_payload + 5
        self.max_message_bytes = 3 * _SMALL_FRAME + self.max_last_frame
        self._sel = selectors.DefaultSelector()
        self._peers: Dict[str, _Peer] = {}
        self.counters: Dict[str, int] = {}
        self.last_error: Optional[str] = None

    # --- endpoints ------------------------------------------------------------------

    def connect(self, endpoint: str) -> None:
        """Follow a publisher (ValueError for an endpoint that is not ``tcp://host:port``)."""
        if endpoint in self._peers:
            return
        peer = _Peer(endpoint, parse_endpoint(endpoint))
        self._peers[endpoint] = peer
        self._open(peer)

    def disconnect(self, endpoint: str) -> None:
        peer = self._peers.pop(endpoint, None)
        if peer is not None:
            self._close(peer)

    def close(self) -> None:
        for peer in list(self._peers.values()):
            self._close(peer)
        self._peers.clear()
        self._sel.close()

    # --- the loop ---------------------------------------------------------------------

    def poll(self, waker: socket.socket, timeout: Optional[float] = None) -> Tuple[bool, List[List[bytes]], List[str]]:
        """Wait for traffic; ``(woken, messages, malformed reasons)``."""
        now = time.monotonic()
        wait = timeout
        for peer in self._peers.values():
            if peer.state == "idle":
                if peer.retry_at <= now:
                    self._open(peer)
                else:
                    left = peer.retry_at - now
                    wait = left if wait is None else min(wait, left)
        try:
            self._sel.get_key(waker)
        except KeyError:
            self._sel.register(waker, selectors.EVENT_READ, None)
        woken = False
        messages: List[List[bytes]] = []
        errors: List[str] = []
        for key, events in self._sel.select(wait):
            peer = key.data
            if peer is None:
                woken = True
                continue
            if peer.state == "connecting":
                self._connected(peer)
            elif events & selectors.EVENT_READ:
                self._read(peer, messages, errors)
        return woken, messages, errors

    # --- connections ------------------------------------------------------------------

    def _inc(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _open(self, peer: _Peer) -> None:
        host, port = peer.address
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            # Out of descriptors, for example: try again later, said once per failure.
            self._retry_later(peer, f"cannot open a socket for {peer.endpoint}: {exc}")
            return
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer.sock = sock
        peer.state = "connecting"
        rc = sock.connect_ex((host, port))
        if rc not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._drop(peer, f"cannot connect to {peer.endpoint}: {errno.errorcode.get(rc, rc)}")
            return
        self._sel.register(sock, selectors.EVENT_WRITE, peer)
        self._inc("connect_attempts")

    def _connected(self, peer: _Peer) -> None:
        sock = peer.sock
        assert sock is not None
        rc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc:
            self._drop(peer, f"cannot connect to {peer.endpoint}: {errno.errorcode.get(rc, rc)}")
            return
        try:
            sock.send(_GREETING)
        except OSError as exc:
            self._drop(peer, f"{peer.endpoint}: {exc}")
            return
        peer.state = "greeting"
        self._sel.modify(sock, selectors.EVENT_READ, peer)

    def _retry_later(self, peer: _Peer, why: str) -> None:
        self.last_error = why
        peer.state = "idle"
        peer.retry_at = time.monotonic() + peer.delay
        peer.delay = min(2.0, peer.delay * 2)

    def _close(self, peer: _Peer) -> None:
        if peer.sock is not None:
            try:
                self._sel.unregister(peer.sock)
            except (KeyError, ValueError):
                pass
            peer.sock.close()
            peer.sock = None
        peer.buf = bytearray()
        peer.skip = 0
        peer.reset_message()

    def _drop(self, peer: _Peer, why: str) -> None:
        """Close the connection and retry later (the publisher may come back)."""
        if peer.state == "ready":
            self._inc("disconnected")
        self._close(peer)
        self._retry_later(peer, why)

    # --- bytes → frames → messages -----------------------------------------------------

    def _read(self, peer: _Peer, messages: List[List[bytes]], errors: List[str]) -> None:
        sock = peer.sock
        assert sock is not None
        for _ in range(_READ_PER_POLL // _CHUNK):
            try:
                data = sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(peer, f"{peer.endpoint}: {exc}")
                return
            if not data:
                self._drop(peer, f"{peer.endpoint} closed the connection")
                return
            peer.buf += data
            why = self._parse(peer, messages, errors)
            if why is not None:
                self._inc("protocol_errors")
                self._drop(peer, f"{peer.endpoint}: {why}")
                return
            if len(data) < _CHUNK:
                return

    def _parse(self, peer: _Peer, messages: List[List[bytes]], errors: List[str]) -> Optional[str]:
        """Consume what ``peer.buf`` holds; a protocol error's text, or None."""
        buf = peer.buf
        pos = 0
        end = len(buf)
        if peer.state == "greeting":
            if end < 64:
                return None
            if buf[0] != 0xFF or buf[9] != 0x7F or buf[10] < 3:
                return "not a ZMTP 3 peer"
            if bytes(buf[12:32]).rstrip(b"\x00") != b"NULL":
                return "a security mechanism other than NULL"
            pos = 64
            assert peer.sock is not None
            try:
                peer.sock.send(_READY + _frame(b"\x01" + self.subscription))
            except OSError as exc:
                return str(exc)
            peer.state = "handshake"
        while pos < end:
            if peer.skip:
                take = min(peer.skip, end - pos)
                pos += take
                peer.skip -= take
                if peer.skip:
                    break
                _frame_done(peer, messages, errors)
                continue
            flags = buf[pos]
            if flags & 0xF8:
                return f"bad frame flags {flags:#x}"
            if flags & _LONG:
                if end - pos < 9:
                    break
                size = int.from_bytes(buf[pos + 1:pos + 9], "big")
                head = 9
            else:
                if end - pos < 2:
                    break
                size = buf[pos + 1]
                head = 2
            more = bool(flags & _MORE)
            if flags & _COMMAND:
                if size > _SMALL_FRAME:
                    return f"a {size}-byte command"
                if end - pos < head + size:
                    break
                why = self._command(peer, bytes(buf[pos + head:pos + head + size]))
                if why is not None:
                    return why
                pos += head + size
                continue
            if peer.state != "ready":
                return "a message before the READY command"
            index = peer.nframes
            limit = self.max_last_frame if index == FRAMES - 1 else _SMALL_FRAME if index < FRAMES else -1
            if size > limit:
                # Read past it without keeping it; the message is malformed.
                if peer.bad is None:
                    peer.bad = "bad_frame_count" if index >= FRAMES else "oversized"
                peer.frames = []
                peer.nframes, peer.more, peer.skip = index + 1, more, size
                pos += head
                if not size:  # an empty extra frame: nothing to read past
                    _frame_done(peer, messages, errors)
                continue
            if end - pos < head + size:
                break  # not complete yet: read again from its header
            peer.nframes, peer.more = index + 1, more
            if peer.bad is None:
                peer.frames.append(bytes(buf[pos + head:pos + head + size]))
            pos += head + size
            _frame_done(peer, messages, errors)
        del buf[:pos]
        return None

    def _command(self, peer: _Peer, body: bytes) -> Optional[str]:
        if not body or len(body) < 1 + body[0]:
            return "a malformed command"
        name = body[1:1 + body[0]]
        if name == b"READY":
            if peer.state != "handshake":
                return "READY twice"
            peer.state = "ready"
            peer.delay = 0.1  # connected: the back-off starts afresh
            self._inc("handshakes")
            return None
        if name == b"PING":
            # PING: 2-byte TTL, then a context echoed in the PONG.
            assert peer.sock is not None
            try:
                peer.sock.send(_command(b"PONG", body[1 + body[0] + 2:]))
            except OSError as exc:
                return str(exc)
            return None
        if name == b"ERROR":
            return "the peer sent ERROR: " + body[1 + body[0] + 1:].decode("utf-8", "replace")[:200]
        return None  # other commands (SUBSCRIBE echoes, PONG) carry nothing for a subscriber


def _frame_done(peer: _Peer, messages: List[List[bytes]], errors: List[str]) -> None:
    """A frame was read (or read past): after the last one, the message is complete or malformed."""
    if peer.more:
        return
    if peer.bad is None:
        messages.append(peer.frames)
    else:
        errors.append(peer.bad)
    peer.reset_message()
