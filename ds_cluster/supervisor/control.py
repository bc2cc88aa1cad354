"""The supervisor's control channel: `DATA/supervisor.sock`, line-delimited JSON.

A local admin interface for `ds-cluster scale` and `ds-cluster status --data-dir`. The
socket is created mode 0600 in the data dir: filesystem permissions are its
authentication, as for the data itself. One request line per connection, then answer
lines until the supervisor closes it:

    -> {"op": "scale", "shards": 4}
    <- {"type": "progress", "text": "...", ...}      (any number)
    <- {"type": "result", "ok": true, "message": "..."}

    -> {"op": "status"}
    <- {"type": "result", "ok": true, "status": {...}}

Nothing from the socket is trusted: a request line is at most MAX_REQUEST bytes and must
arrive within REQUEST_DEADLINE seconds; an answer line that the client does not take
within SEND_DEADLINE seconds drops that client (what it asked for goes on: a scale is
journaled and owned by the supervisor, not by the connection that asked for it); at
most MAX_CLIENTS connections are served at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

SOCKET_NAME = "supervisor.sock"
MAX_REQUEST = 4096
MAX_ANSWER_LINE = 1024 * 1024  # a status of many shards is still far below this
REQUEST_DEADLINE = 5.0
SEND_DEADLINE = 30.0
MAX_CLIENTS = 16
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL

Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Send], Awaitable[None]]


class ControlError(Exception):
    """The supervisor could not be reached, or broke the protocol."""


class RequestError(Exception):
    """A request the supervisor refuses (answered as a failed result)."""


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


@contextlib.contextmanager
def _address(path: Path) -> Any:
    """An AF_UNIX address for `path`, even one longer than sun_path: through the
    directory's descriptor (/proc/self/fd/N/NAME), which the kernel resolves like any
    path."""
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def serve(
    data_dir: Path,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket of `data_dir` until cancelled; removes it on exit.

    The caller holds the data dir's supervisor lock, so a socket file left there is a
    dead supervisor's and is replaced."""
    path = socket_path(data_dir)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            with _address(path) as address:
                await listener.bind(address)
        finally:
            os.umask(old_umask)
        listener.listen(MAX_CLIENTS)
        limit = trio.CapacityLimiter(MAX_CLIENTS)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                stream = trio.SocketStream(conn)
                try:
                    limit.acquire_on_behalf_of_nowait(stream)  # taken here, not in the task
                except trio.WouldBlock:
                    await _refuse(stream, "too many control connections")
                    continue
                nursery.start_soon(_serve_one, stream, handler, limit)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def _refuse(stream: trio.SocketStream, message: str) -> None:
    with trio.move_on_after(1.0):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(_line({"type": "result", "ok": False, "message": message}))
    await trio.aclose_forcefully(stream)


async def _serve_one(
    stream: trio.SocketStream, handler: Handler, limit: trio.CapacityLimiter
) -> None:
    try:
        try:
            with trio.fail_after(REQUEST_DEADLINE):
                request = await _read_request(stream)
        except trio.TooSlowError:
            await _refuse(stream, f"no request line within {REQUEST_DEADLINE:g} s")
            return
        except RequestError as exc:
            await _refuse(stream, str(exc))
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return

        async def send(message: dict[str, Any]) -> None:
            with trio.fail_after(SEND_DEADLINE):
                await stream.send_all(_line(message))

        try:
            await handler(request, send)
        except RequestError as exc:
            with contextlib.suppress(trio.BrokenResourceError, trio.TooSlowError):
                await send({"type": "result", "ok": False, "message": str(exc)})
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client left or stopped reading: what it asked for goes on
        finally:
            await trio.aclose_forcefully(stream)
    finally:
        limit.release_on_behalf_of(stream)


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    buffer = bytearray()
    while b"\n" not in buffer:
        if len(buffer) > MAX_REQUEST:
            raise RequestError(f"request line over {MAX_REQUEST} bytes")
        data = await stream.receive_some(MAX_REQUEST)
        if not data:
            raise RequestError("connection closed before a request line")
        buffer += data
    line = bytes(buffer.split(b"\n", 1)[0])
    if len(line) > MAX_REQUEST:
        raise RequestError(f"request line over {MAX_REQUEST} bytes")
    try:
        request = json.loads(line)
    except ValueError:
        raise RequestError("request is not JSON") from None
    if type(request) is not dict or type(request.get("op")) is not str:
        raise RequestError('request is not an object with an "op"')
    return request


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


# ---- client side ------------------------------------------------------------------


async def request(
    data_dir: Path, message: dict[str, Any], *, idle_timeout: float
) -> AsyncIterator[dict[str, Any]]:
    """Send `message` to the supervisor of `data_dir`; yield each answer line.

    ControlError if nobody serves the socket, or on an answer that breaks the protocol
    or a silence longer than `idle_timeout`.
    """
    path = socket_path(data_dir)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(path) as address:
            await sock.connect(address)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ControlError(f"no supervisor is running for {data_dir} ({path})") from None
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot reach the supervisor at {path}: {exc.strerror}") from None
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(_line(message))
        buffer = bytearray()
        while True:
            while b"\n" in buffer:
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer = bytearray(rest)
                try:
                    answer = json.loads(line)
                except ValueError:
                    raise ControlError("the supervisor sent a line that is not JSON") from None
                if type(answer) is not dict:
                    raise ControlError("the supervisor sent a line that is not an object")
                yield answer
                if answer.get("type") == "result":
                    return
            if len(buffer) > MAX_ANSWER_LINE:
                raise ControlError("the supervisor sent an over-long line")
            with trio.move_on_after(idle_timeout) as scope:
                data = await stream.receive_some(65536)
            if scope.cancelled_caught:
                raise ControlError(f"the supervisor said nothing for {idle_timeout:g} s")
            if not data:
                raise ControlError("the supervisor closed the connection before a result")
            buffer += data
