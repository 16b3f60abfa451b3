"""A free local TCP port: the tensor-parallel rendezvous, and the local servers of benches and tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
