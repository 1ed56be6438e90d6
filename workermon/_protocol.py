"""The host agent's protocol, imported by both ends: where it lives, whom to trust, what crosses.

Location: ``$WORKERMON_AGENT_SOCKET``, else ``$XDG_RUNTIME_DIR/workermon/agent.sock``
when the runtime directory is this user's own, else
``/tmp/workermon-<uid>/agent.sock``.  The directory must be this user's, a real
directory (not a link) and writable by nobody else — sticky world-writable
directories such as ``/tmp`` itself included — so no other user can create
the socket or the shared-memory file first.  Both ends check it, and the
client also checks the socket's owner and the listening process's uid
(``SO_PEERCRED``).  Every refusal raises ``PermissionError`` naming the reason.

Wire: a frame is a 4-byte big-endian length and that many bytes of msgpack,
a map with a string ``t``.  Requests (client → agent) are small
(``MAX_REQUEST``); replies may be large (``load_states`` of 10,000 workers is a
few MB), bounded by ``MAX_REPLY``.

Agent → client: ``hello`` (first: the shared-memory file, the agent's epoch,
the client's booking row), ``state`` (busy set, members, version, readiness —
on every change), ``reply`` (to a request with an ``id``), ``pong``,
``refused`` (then the connection closes).  Client → agent: ``ping``,
``overloaded``, ``why``, ``load_states``, ``load_state``, ``health``,
``thresholds``, ``set_thresholds``.  Picking never crosses the socket: it
reads the shared memory (:mod:`workermon._shm`).
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from typing import Any, Dict, List, Optional

import msgspec

__all__ = [
    "FrameError", "FrameReader", "MAX_REPLY", "MAX_REQUEST", "REQUESTS", "SHM_NAME", "check_private_dir",
    "check_socket_file", "default_socket_path", "encode_frame", "peer_uid", "prepare_private_dir",
]

MAX_REQUEST = 1 << 20
MAX_REPLY = 256 << 20
SHM_NAME = "fleet.shm"
REQUESTS = frozenset({"ping", "overloaded", "why", "load_states", "load_state", "health", "thresholds",
                      "set_thresholds"})
_LEN = struct.Struct(">I")


def default_socket_path() -> str:
    explicit = os.environ.get("WORKERMON_AGENT_SOCKET")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            st = os.lstat(runtime)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
                return os.path.join(runtime, "workermon", "agent.sock")
        except OSError:
            pass
    return os.path.join("/tmp", f"workermon-{os.getuid()}", "agent.sock")


def check_private_dir(directory: str) -> None:
    """Refuse a directory another user could have made or can write to (PermissionError, with why)."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise PermissionError(f"{directory} does not exist (is the workermon agent running?)") from None
    if stat.S_ISLNK(st.st_mode):
        raise PermissionError(f"{directory} is a symbolic link: refusing it (use a real private directory)")
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{directory} is not a directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{directory} belongs to uid {st.st_uid}, not to this user ({os.getuid()}): "
                              "another user may have created it first; choose another socket path")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        sticky = " (sticky, like /tmp)" if st.st_mode & stat.S_ISVTX else ""
        raise PermissionError(f"{directory} is writable by others (mode {st.st_mode & 0o7777:o}){sticky}: "
                              "the socket needs a directory of its own, e.g. /tmp/workermon-<uid>/agent.sock")


def prepare_private_dir(path: str) -> str:
    """The agent: create the socket's directory (``0700``) if missing, then check it; its path."""
    directory = os.path.dirname(os.path.abspath(path))
    parent = os.path.dirname(directory)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    check_private_dir(directory)
    return directory


def check_socket_file(path: str) -> None:
    """The client: the socket must be a socket of this user's in a private directory."""
    check_private_dir(os.path.dirname(os.path.abspath(path)))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no workermon agent socket at {path}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise PermissionError(f"{path} is not a socket")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})")


def peer_uid(sock: socket.socket) -> Optional[int]:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def encode_frame(msg: Dict[str, Any]) -> bytes:
    body = msgspec.msgpack.encode(msg)
    return _LEN.pack(len(body)) + body


class FrameError(ValueError):
    """Bytes on the socket that are not a valid frame."""


class FrameReader:
    """Splits a byte stream into decoded frames; raises :class:`FrameError` on hostile input.

    A frame longer than ``max_frame`` is refused from its header, before it is read.
    """

    def __init__(self, max_frame: int = MAX_REQUEST) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> List[Dict[str, Any]]:
        self._buf += data
        out: List[Dict[str, Any]] = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self._max:
                raise FrameError(f"frame of {n} bytes > {self._max}")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4:4 + n])
            del self._buf[:4 + n]
            try:
                msg = msgspec.msgpack.decode(body)
            except (msgspec.DecodeError, RecursionError) as exc:
                raise FrameError(f"not msgpack: {exc}") from None
            if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
                raise FrameError("a frame must be a map with a string 't'")
            out.append(msg)
        return out
