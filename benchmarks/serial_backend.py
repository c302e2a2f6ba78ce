"""The backend of the replicas benchmark: one request at a time, each taking a set time.

    python benchmarks/serial_backend.py --port P [--delay 0.02] [--replica R]
                                        [--slow-replica S --slow-delay 0.2]

The stdlib's `http.server.HTTPServer`, not the threading one: one process serves
one request at a time, as an app held to one core by the GIL (or a sync worker)
does, so more of them can only come from more replicas. Each request other than
`GET /health` and `GET /stats` waits `--delay` seconds before it is answered; the
replica whose slot (`{replica}` in rotator's command) is `--slow-replica` waits
`--slow-delay` instead. The wait is a sleep, not work: the replicas of a
benchmark then need no CPU to speak of, so the machine's two shared cores bound
none of the figures.

- HTTP/1.0, one request per connection: a server that handles one connection at a
  time cannot leave a keep-alive connection idle without holding every other
  client out (nginx's upstream `keepalive` and rotator's idle pool both would).
- A listen backlog of 1024 (gunicorn's is 2048): with the stdlib's default of 5,
  the kernel drops the SYNs of further waiting connections and the client
  retries a second later, which would measure TCP's retry timer, not balancing.
- `GET /stats` answers {"served": n, "busy": s, "replica": r, "pid": p}: the requests
  it has answered so far (not /health, not /stats), and the seconds it spent on
  requests (every kind, from accepting one to having written its answer), so that
  a benchmark can see how a balancer shared the load and how much of a run a
  replica was busy. Answering it also means the requests queued before it were
  served.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

BODY = b'{"ok": true}'


class Server(HTTPServer):
    request_queue_size = 1024
    delay = 0.0
    replica = 0
    served = 0
    busy = 0.0  # seconds spent on requests, from accepting one to its answer's last byte

    def finish_request(self, request: Any, client_address: Any) -> None:
        began = time.monotonic()
        try:
            super().finish_request(request, client_address)
        finally:
            self.busy += time.monotonic() - began

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client (a proxy, a timed-out health probe) that went away before its answer
        # was written is not this benchmark's concern: no traceback in the log.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        if self.path == "/health":
            self.answer(b"ok")
        elif self.path == "/stats":
            stats = {"served": self.server.served, "busy": self.server.busy,
                     "replica": self.server.replica, "pid": os.getpid()}  # fmt: skip
            self.answer(json.dumps(stats).encode())
        else:
            time.sleep(self.server.delay)
            self.server.served += 1
            self.answer(BODY)

    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance-Pid", str(os.getpid()))
        self.send_header("X-Replica", str(self.server.replica))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would cost more than the benchmark's proxies do


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--delay", type=float, default=0.02, metavar="SECONDS")
    p.add_argument("--replica", type=int, default=int(os.environ.get("ROTATOR_REPLICA", "0")))
    p.add_argument("--slow-replica", type=int, default=-1, metavar="SLOT")
    p.add_argument("--slow-delay", type=float, default=0.2, metavar="SECONDS")
    args = p.parse_args(argv)
    server = Server((args.host, args.port), Handler)
    server.replica = args.replica
    server.delay = args.slow_delay if args.replica == args.slow_replica else args.delay
    print(f"serial backend pid {os.getpid()} replica {args.replica} on {args.host}:{args.port}, "
          f"{server.delay * 1000:g} ms per request", flush=True)  # fmt: skip
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
