"""Running the app with uvicorn: in the foreground (dogtl serve) or in a thread (tests, benchmark).

uvicorn stops on Ctrl-C and SIGTERM after the requests in flight have finished (up to
`grace_s`); then the app's lifespan ends the batcher.
"""

from __future__ import annotations

import threading
import time


def make_server(app, host: str = "127.0.0.1", port: int = 8000, grace_s: float = 30, log_level: str = "warning"):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=grace_s, access_log=False))


class ServerThread:
    """The app served on 127.0.0.1 at a free port from a background thread (no signal handlers)."""

    def __init__(self, app, grace_s: float = 10):
        self.server = make_server(app, port=0, grace_s=grace_s)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="dogtl-serve")

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self, timeout: float = 30) -> None:
        """What SIGTERM does: stop accepting, finish the requests in flight, end."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __exit__(self, *exc):
        self.stop()
