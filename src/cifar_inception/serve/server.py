"""Running the app with uvicorn on a socket bound here, so that a busy port or an unknown host
is a one-line error and ``--port 0`` can report the port it was given.

uvicorn's HTTP protocol is extended with what it lacks against slow or many clients: a time
limit on a request's headers and one on its body (a client trickling a byte at a time keeps
a connection, and a file descriptor, for ever otherwise), and a cap on open connections
below the process's file limit, over which a connection is answered 503 and closed at once.
The connection cap and the accept batch together keep the listener from running out of file
descriptors, and the "out of system resource" error asyncio logs when it does anyway is
logged once a minute, without its traceback.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import time

from cifar_inception.errors import CifarInceptionError

# Connections waiting to be accepted, which is also how many asyncio accepts in one turn of
# the event loop, before any of them can be refused: not uvicorn's 2048, which alone would
# exceed the usual limit of 1,024 open files.
ACCEPT_BATCH = BACKLOG = 128
# File descriptors kept free beside connections: the model, logs, spooled uploads, threads.
FILE_RESERVE = 64
# A client that connects has this long to send its request line and headers, and then this
# long for its body (10 MiB at about 1.5 Mbit/s); the idle time between requests on a
# keep-alive connection is uvicorn's own 5 s.
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 60.0
MAX_CONNECTIONS = 512
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                 b"content-length: 45\r\nconnection: close\r\nretry-after: 1\r\n\r\n"
                 b'{"error": "too many connections; try again"}\n')

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_connections: int = MAX_CONNECTIONS


class OncePerInterval:
    """True at most once per ``seconds``: a log line that cannot become a flood."""

    def __init__(self, seconds: float = 60.0):
        self.seconds = seconds
        self.last = -float("inf")

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


class AcceptErrorFilter(logging.Filter):
    """asyncio logs "socket.accept() out of system resource", with a traceback, once per
    connection it fails to accept, which is thousands a second when file descriptors run
    out: let one through a minute, as one line."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, seconds: float = 60.0):
        super().__init__()
        self.due = OncePerInterval(seconds)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        if not self.due():
            return False
        reason = record.exc_info[1] if record.exc_info else None
        why = getattr(reason, "strerror", None) or reason
        record.msg = (f"cannot accept new connections ({why}); they wait in the backlog "
                      "(logged at most once a minute)")
        record.args = ()
        record.exc_info = record.exc_text = None
        return True


def guarded_protocol(limits: ConnectionLimits) -> type:
    """uvicorn's h11 protocol with ``limits``: header and body timeouts, a connection cap."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    refusal_logged = OncePerInterval()

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            self.deadline = None
            self.phase: str | None = None
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                if refusal_logged():
                    log.warning("over %d open connections: refusing new ones with 503 "
                                "(logged at most once a minute)", limits.max_connections)
                transport.write(BUSY_RESPONSE)
                transport.close()
                return
            self.follow_request()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.follow_request()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.follow_request()

        def connection_lost(self, exc: Exception | None) -> None:
            self.set_deadline(None, None)
            super().connection_lost(exc)

        def follow_request(self) -> None:
            """Time the part of the request now awaited: its headers, then its body."""
            if self.transport.is_closing():
                self.set_deadline(None, None)
            elif self.conn.their_state is h11.IDLE:
                self.set_deadline("headers", limits.header_timeout)
            elif self.conn.their_state is h11.SEND_BODY:
                self.set_deadline("body", limits.body_timeout)
            else:
                self.set_deadline(None, None)  # the request is in: the app answers it

        def set_deadline(self, phase: str | None, seconds: float | None) -> None:
            if phase == self.phase:
                return
            if self.deadline is not None:
                self.deadline.cancel()
            self.phase = phase
            self.deadline = (self.loop.call_later(seconds, self.too_slow)
                             if seconds is not None else None)

        def too_slow(self) -> None:
            # Nothing useful can be sent mid-request; closing frees the connection (a body
            # being read ends as a client disconnect, answered by nobody).
            self.deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def connection_cap(wanted: int = MAX_CONNECTIONS) -> int:
    """``wanted``, lowered to fit the file limit, which is first raised to its hard maximum."""
    try:
        import resource
    except ImportError:  # not POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    # Up to three accept batches may be open before the first of them is refused.
    return max(1, min(wanted, soft - FILE_RESERVE - 3 * ACCEPT_BATCH))


def open_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port)."""
    if not 0 <= port <= 65535:
        raise CifarInceptionError(f"port must be from 0 to 65535, not {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise CifarInceptionError(f"cannot resolve host {host!r} ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restarted server may rebind while old connections linger.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise CifarInceptionError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def build_server(app, *, access_log: bool = True, log_level: str = "info",
                 limits: ConnectionLimits | None = None):
    """A uvicorn server for ``app`` with :class:`ConnectionLimits` (by default the module's,
    the connection cap fitted to the file limit)."""
    import uvicorn

    if limits is None:
        limits = ConnectionLimits(max_connections=connection_cap())
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=5, http=guarded_protocol(limits),
                            backlog=ACCEPT_BATCH)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, AcceptErrorFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(AcceptErrorFilter())
    return uvicorn.Server(config)


def run_server(app, sock: socket.socket, *, access_log: bool = True,
               log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` until Ctrl+C (uvicorn's own signal handling)."""
    build_server(app, access_log=access_log, log_level=log_level).run(sockets=[sock])
