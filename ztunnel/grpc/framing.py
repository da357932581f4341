"""gRPC length-prefixed messages: 1 byte compressed flag, 4 bytes big-endian length (sans-IO)."""

from __future__ import annotations

import struct

from ztunnel.grpc.status import GrpcError, StatusCode

PREFIX = struct.Struct(">BI")
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's default receive limit


def frame_message(message: bytes) -> bytes:
    return PREFIX.pack(0, len(message)) + message


class MessageReader:
    """Reassembles messages from DATA payloads of one stream.

    Raises GrpcError: RESOURCE_EXHAUSTED for a message over ``max_message`` (checked
    on the prefix, before buffering it), INTERNAL for a compressed message (we never
    advertise an encoding, so a peer must not compress).
    """

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._need: int | None = None  # body length of the message being read

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            if self._need is None:
                if len(self._buf) < PREFIX.size:
                    return out
                flag, length = PREFIX.unpack_from(self._buf)
                if flag != 0:
                    raise GrpcError(StatusCode.INTERNAL, "compressed message without encoding")
                if length > self.max_message:
                    raise GrpcError(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"message of {length} bytes exceeds the limit of {self.max_message}",
                    )
                del self._buf[: PREFIX.size]
                self._need = length
            if len(self._buf) < self._need:
                return out
            out.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = None

    @property
    def partial(self) -> bool:
        """Whether a message was started and not finished (an error at end of stream)."""
        return self._need is not None or bool(self._buf)
