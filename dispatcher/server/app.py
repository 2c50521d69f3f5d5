"""The HTTP endpoint of `dispatcher run`: Twilio webhooks, health and metrics, on uvicorn.

It runs inside the daemon's event loop (`serve`), shares its engine and database, and leaves
signals to the daemon. No request can take the daemon down: every handler's exception becomes
a 500 with one log line, never a traceback in a response.

    POST /twilio/status    signed delivery receipts          (twilio_hooks.py)
    POST /twilio/inbound   signed replies: STOP / 退订 / START (twilio_hooks.py)
    GET  /healthz          200 when the database answers and the engine runs, else 503
    GET  /metrics          Prometheus text                   (metrics.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
from collections.abc import Awaitable, Callable, Generator
from typing import Final

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from dispatcher.config.loader import Config
from dispatcher.engine.engine import Engine
from dispatcher.errors import ConfigError, DispatcherError, Problem
from dispatcher.logs import first_line, mask_text
from dispatcher.server import metrics
from dispatcher.server.twilio_hooks import TwilioHooks
from dispatcher.store.database import Database

__all__ = ["build_app", "parse_listen", "serve"]

log = logging.getLogger("dispatcher.server")

Endpoint = Callable[[Request], Awaitable[Response]]
#: How long a health check waits for the database.
PING_TIMEOUT_S: Final = 5.0
#: How long in-flight requests may take to finish when the daemon stops.
SHUTDOWN_GRACE_S: Final = 5
#: How long `serve` waits for uvicorn to take over the bound socket.
STARTUP_TIMEOUT_S: Final = 10.0


def build_app(
    engine: Engine, db: Database, config: Config, *, stopping: asyncio.Event | None = None
) -> Starlette:
    """The ASGI app over `engine` and `db`; `stopping` is the daemon's stop request, if any."""
    hooks = TwilioHooks(engine, db, config)
    http = metrics.HttpCounts()

    async def healthz(request: Request) -> Response:
        body: dict[str, str] = {"worker": engine.worker_id}
        reasons = []
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                await db.ping()
            body["database"] = "ok"
        except TimeoutError:
            body["database"] = "no answer"
            reasons.append(f"the database did not answer within {PING_TIMEOUT_S:g}s")
        except DispatcherError as exc:
            body["database"] = "unreachable"
            reasons.append(str(exc))
        if engine.stopping or (stopping is not None and stopping.is_set()):
            body["scheduler"] = "stopping"
            reasons.append("the daemon is stopping")
        else:
            body["scheduler"] = "running"
        if reasons:
            body["reason"] = "; ".join(reasons)
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    async def metrics_text(request: Request) -> Response:
        text = await metrics.render(engine, db, http)
        return Response(text, media_type=metrics.CONTENT_TYPE)

    def route(path: str, endpoint: Endpoint, method: str) -> Route:
        return Route(path, _guarded(path, endpoint, http), methods=[method])

    routes = [
        route("/twilio/status", hooks.status, "POST"),
        route("/twilio/inbound", hooks.inbound, "POST"),
        route("/healthz", healthz, "GET"),
        route("/metrics", metrics_text, "GET"),
    ]
    return Starlette(routes=routes)


def _guarded(name: str, endpoint: Endpoint, http: metrics.HttpCounts) -> Endpoint:
    """`endpoint`, with refusals as short plain-text answers and any failure as a logged 500."""

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        try:
            response = await endpoint(request)
        except HTTPException as exc:
            response = PlainTextResponse(f"{exc.detail}\n", status_code=exc.status_code)
        except ClientDisconnect:
            response = Response(status_code=400)  # nobody is listening; counted, not logged
        except Exception as exc:
            log.error(
                "%s %s failed: %s: %s",
                request.method,
                request.url.path,
                type(exc).__name__,
                mask_text(first_line(exc)),
            )
            response = PlainTextResponse("internal error\n", status_code=500)
        http.count(name, response.status_code)
        return response

    return guarded


# -- serving -------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handlers: the daemon owns SIGTERM and SIGINT.

    uvicorn 0.54's `serve()` wraps everything in `capture_signals()`, which replaces the
    process's SIGINT/SIGTERM handlers with its own (and re-raises them when it stops); that
    would steal the daemon's graceful shutdown. Here it captures nothing.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def parse_listen(listen: str) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port` (the `server.listen` key) into host and port."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _bind(config: Config) -> socket.socket:
    """A listening socket on `server.listen`; a failure is a ConfigError naming the key."""
    listen = config.root.server.listen
    host, port = parse_listen(listen)

    def refuse(why: str) -> ConfigError:
        return ConfigError(
            [
                Problem(
                    f"cannot listen on {listen}: {why}", file=str(config.path), key="server.listen"
                )
            ]
        )

    if port > 65535:
        raise refuse("the port must be 0-65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ][0]
    except socket.gaierror as exc:
        raise refuse(f"unknown host ({exc.strerror})") from None
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        reasons = {
            errno.EADDRINUSE: "the address is already in use (is another dispatcher or service "
            "running there?): stop it or change server.listen",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
            errno.EADDRNOTAVAIL: "that address does not belong to this machine",
        }
        raise refuse(reasons.get(exc.errno or 0, exc.strerror or str(exc))) from None
    sock.setblocking(False)
    return sock


async def serve(
    engine: Engine, db: Database, stop_event: asyncio.Event
) -> Callable[[], Awaitable[None]]:
    """Start the endpoint on `server.listen` in this event loop; return its async stop function.

    The socket is bound here, before uvicorn starts, so a port in use is a `ConfigError`
    (naming the key) instead of uvicorn's `sys.exit`.
    """
    config = engine.config
    sock = _bind(config)
    host, port = sock.getsockname()[:2]
    app = build_app(engine, db, config, stopping=stop_event)
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            lifespan="off",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http-server")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT_S
    # uvicorn has no "started" event to wait on; its flag is set once it serves the socket.
    while not server.started and not task.done() and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    if not server.started:
        server.should_exit = True
        reason = _startup_failure(task)
        sock.close()
        raise DispatcherError(
            f"the HTTP endpoint did not start on {config.root.server.listen}: {reason}"
        )
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "HTTP endpoint listening on http://%s:%d (public URL: %s)",
        shown,
        port,
        config.root.server.public_url or "not set",
    )

    async def stop() -> None:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=SHUTDOWN_GRACE_S + 5)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except Exception as exc:
            log.warning("the HTTP endpoint stopped with an error: %s", type(exc).__name__)
        finally:
            sock.close()

    return stop


def _startup_failure(task: asyncio.Task[None]) -> str:
    if not task.done():
        task.cancel()
        return f"no answer within {STARTUP_TIMEOUT_S:g}s"
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return f"{type(exc).__name__}: {exc}" if exc is not None else "it stopped at once"
