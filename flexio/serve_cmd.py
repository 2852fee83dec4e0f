"""`python -m flexio serve` -> an OpenAI- and Ollama-compatible HTTP server: server.create_app under uvicorn.

The socket is bound first (a port in use is one error line, exit 1), then uvicorn serves while the
engine loads (/health: 503 "loading", then 200). If loading fails the server stops and the
error is reported as by every command (exit 1, or 2 for a parameter out of range). Ctrl-C or
SIGTERM: stop accepting, end every generation at its next token (a 503 "shutting down", or that
error as the last event of a stream), wait up to GRACEFUL_SHUTDOWN_S seconds for the connections
(then cancel what is left), close the engine, exit (uvicorn then re-raises the signal: 130 for
Ctrl-C, as the other commands).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import sys

from .errors import FlexioError, ParameterError
from .fetch import DEFAULT_MODEL
from .options import add_engine_arguments, engine_kwargs

GRACEFUL_SHUTDOWN_S = 5.0  # in-flight requests still running this long after Ctrl-C/SIGTERM are cancelled


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="a .gguf path or a known model name (default: %(default)s)")
    p.add_argument("--model-alias", "-a", default=None,
                   help="the model id clients see and send (default: the GGUF file's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--parallel", "-np", type=int, default=1,
                   help="requests generated at once, each in its own sequence slot (default: %(default)s)")
    p.add_argument("-c", "--n-ctx", type=int, default=None,
                   help="context in tokens shared by the --parallel slots, as llama-server's -c: each request may "
                        "use n_ctx // parallel tokens, prompt and answer together (default: the model's own, at "
                        "most 4096; 0: the model's own)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait while --parallel run; more are refused with 503 "
                        "(default: 4 x --parallel)")
    p.add_argument("-n", "--max-tokens", type=int, default=None,
                   help="the most tokens one request generates: a request asking more gets this many, "
                        "finish_reason 'length' (as llama-server's -n; default: the rest of the slot's context)")
    p.add_argument("--api-key", default=os.environ.get("FLEXIO_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $FLEXIO_API_KEY, else none)")
    add_engine_arguments(p)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when host has a colon); errors name the address."""
    if isinstance(port, bool) or not 0 <= port <= 65535:
        raise ParameterError(f"port: expected 0..65535 (0: any free port), got {port!r}", param="port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise FlexioError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def make_server(app, *, log_level: str = "info", access_log: bool = True):
    """The uvicorn server for an app: uvloop, ASGI lifespan on, a short graceful shutdown that first
    tells the app's generations to end (server.Served.drain)."""
    import uvicorn

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"  # uvloop: a dependency on Linux

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            served = getattr(app.state, "served", None)
            if served is not None:
                served.drain()
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, loop=loop, lifespan="on", log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, timeout_keep_alive=5)
    return Server(config)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record comes (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass


def _log_to_stderr() -> logging.Logger:
    log = logging.getLogger("flexio")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("flexio: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    return log


def run(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .server import create_app

    log = _log_to_stderr()
    # Every parameter is checked here, before the port is taken and before anything loads.
    engine = Engine(args.model, n_ctx=args.n_ctx, parallel=args.parallel, **engine_kwargs(args),
                    progress=lambda what: log.info("%s ...", what))
    failure: list[BaseException] = []
    server = None

    def stop(err: BaseException) -> None:
        failure.append(err)
        if server is not None:
            server.should_exit = True

    app = create_app(engine, model_alias=args.model_alias, api_key=args.api_key, max_queue=args.max_queue,
                     max_tokens=args.max_tokens, on_load_error=stop)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    server = make_server(app)
    shown = f"[{host}]" if ":" in host else host
    log.info("listening on http://%s:%d (OpenAI API under /v1, Ollama API under /api; the model loads now)",
             shown, port)
    server.run(sockets=[sock])
    if failure:
        raise failure[0]
    return 0
