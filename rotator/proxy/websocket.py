"""Just enough of the WebSocket framing (RFC 6455) to end a tunnel politely.

The proxy pumps websocket bytes untouched; to close one at a drain deadline it
sends the client a close frame (1001, going away), which is only safe between
two frames of the instance's stream. FrameBoundary follows that stream's frame
headers to know when it is between frames. Nothing here decodes payloads.
"""

from __future__ import annotations

# Server to client frames are never masked: FIN + close opcode, length 2, code 1001.
GOING_AWAY = b"\x88\x02\x03\xe9"


class FrameBoundary:
    """Fed the bytes of one direction of a websocket; says whether they end between frames."""

    __slots__ = ("_head", "_remaining")

    def __init__(self) -> None:
        self._head = b""  # a frame header seen in part
        self._remaining = 0  # payload bytes of the current frame still to come

    @property
    def between_frames(self) -> bool:
        return self._remaining == 0 and not self._head

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._remaining:
                step = min(self._remaining, n - i)
                self._remaining -= step
                i += step
                continue
            self._head += data[i : i + 1]
            i += 1
            size = _header_size(self._head)
            if size is not None and len(self._head) == size:
                self._remaining = _payload_length(self._head)
                self._head = b""


def _header_size(head: bytes) -> int | None:
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    mask = 4 if head[1] & 0x80 else 0
    return 2 + extended + mask


def _payload_length(head: bytes) -> int:
    length = head[1] & 0x7F
    if length == 126:
        return int.from_bytes(head[2:4], "big")
    if length == 127:
        return int.from_bytes(head[2:10], "big")
    return length
