"""A real flexio server (uvicorn, uvloop, the ASGI lifespan) on 127.0.0.1 in a thread of the test process,
so a test can drive it over HTTP and still look at its engine."""

from __future__ import annotations

import threading
import time

import httpx

from flexio.serve_cmd import listen, make_server


class ServerThread:
    def __init__(self, app):
        self.app = app
        self.sock = listen("127.0.0.1", 0)  # bound here: the port is known and taken before the thread starts
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, log_level="warning", access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="test-uvicorn",
                                       daemon=True)

    @property
    def engine(self):
        return self.app.state.served.engine

    def start(self, timeout: float = 900) -> ServerThread:
        """Start serving and wait until /health says the model is loaded (the first run compiles kernels)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.thread.is_alive(), "the server thread died while starting"
            try:
                r = httpx.get(f"{self.url}/health", timeout=5)
                if r.status_code == 200:
                    return self
                assert r.json()["status"] == "loading", r.text
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server did not load its model in {timeout} s")

    def stop(self, timeout: float = 60) -> None:
        """What Ctrl-C does: stop accepting, finish or cancel in-flight requests, close the engine."""
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the server did not stop within {timeout} s"
