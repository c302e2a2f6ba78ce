"""The fast backend of proxy_overhead: rotator's demo app, unchanged, on uvloop.

    python benchmarks/fast_backend.py --port P   (the demo's flags)

The demo on plain asyncio is "a typical Python app"; it is slow enough to hide
a proxy's own cost. On uvloop the same app answers faster (1.2-1.5x on 2 cores), which
is what a user who tunes an app tries first, and what shows the proxy's cost.
"""

from __future__ import annotations

import sys

import uvloop

from rotator import demo

if __name__ == "__main__":
    sys.exit(uvloop.run(demo.serve(demo.parse_args(sys.argv[1:]))))
