"""--mode=serve: the OpenAI-compatible HTTP server (flover_jax/server/) on the engine.

The server listens first and answers /health with 503 while the model loads and compiles;
then it serves. On SIGTERM (or SIGINT) it stops taking requests (503), lets those in flight
finish for up to --drain_s, cancels the rest and exits: 0 after SIGTERM, a service's normal
stop; 130 after SIGINT, as every mode.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from flover_jax.cli import common
from flover_jax.cli.flags import FLAGS
from flover_jax.cli.interrupts import Interrupts


def _listen(app):
    """Start uvicorn on its own thread (it then leaves the signals to us) and return it once
    it listens, or raise naming the address it could not take."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=FLAGS.host, port=FLAGS.port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise ValueError(f"--host={FLAGS.host} --port={FLAGS.port}: cannot listen there "
                             "(in use, or not this machine's address)")
        time.sleep(0.05)
    return server, thread


def serve_mode(interrupts: Interrupts) -> int:
    from flover_jax.server.app import ServerState, create_app

    common.follow_unless_process_0()
    if not 0 <= FLAGS.port <= 65535:
        raise ValueError(f"--port={FLAGS.port}: must be in [0, 65535]")
    for name in ("max_waiting", "drain_s", "request_timeout_s"):
        if not FLAGS[name].value >= 0:
            raise ValueError(f"--{name}={FLAGS[name].value}: must be >= 0")
    api_key = FLAGS.api_key or os.environ.get("FLOVER_API_KEY") or None
    state = ServerState(FLAGS.model, api_key=api_key, max_waiting=FLAGS.max_waiting,
                        timeout_s=FLAGS.request_timeout_s)
    server, thread = _listen(create_app(state))
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    print(f"loading {FLAGS.model}; /health answers 503 until it is ready", file=sys.stderr,
          flush=True)
    engine = common.engine()
    engine.executor.warmup()  # every shape bucket now: traffic never waits for a compile
    with interrupts.while_running() as stop:
        state.ready(engine)
        print(f"serving {FLAGS.model} on http://{host}:{port} (/v1/completions, "
              f"/v1/chat/completions; key {'required' if api_key else 'not required'})",
              file=sys.stderr, flush=True)
        stop.wait()
        state.draining = True
        deadline = time.monotonic() + FLAGS.drain_s
        while state.outstanding and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"stopping: {state.outstanding} requests still in flight are cancelled",
              file=sys.stderr, flush=True)
        state.loop.close()
        server.should_exit = True
        thread.join(10)
    return 0 if interrupts.signal == signal.SIGTERM else interrupts.exit_code()
