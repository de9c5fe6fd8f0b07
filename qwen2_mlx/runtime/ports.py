"""Free local TCP ports, for the ring backend of `mlx.launch` (it listens on consecutive ports)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> int:
    """A first port p with p..p+n-1 free on 127.0.0.1 (checked by binding each, then released)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = s.getsockname()[1]
        if start + n > 65535:
            continue
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", start + i))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")
