"""The transfer floor: moving a request's and a response's bytes through a plain loopback TCP
socket, with nothing else (no framing, no (de)serialisation, no compute).

    python benchmarks/wire_floor.py 74000000 50000000      # request bytes, response bytes

The peer runs in its own process, as the server does, so the figure includes the same
process-to-process copies through the kernel. bench_service.py states the service's time as a
multiple of this floor.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import struct
import time

_HEADER = struct.Struct("<QQ")  # request length, response length


def _recv_exact(sock: socket.socket, buf: memoryview, n: int) -> None:
    got = 0
    while got < n:
        k = sock.recv_into(buf[got:n])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


def _peer(conn) -> None:
    """Answers each request of N bytes with M bytes."""
    srv = socket.create_server(("127.0.0.1", 0))
    conn.send(srv.getsockname()[1])
    sock, _ = srv.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = bytearray(_HEADER.size)
    inbuf = memoryview(bytearray(0))
    outbuf = memoryview(bytearray(0))
    try:
        while True:
            try:
                _recv_exact(sock, memoryview(header), _HEADER.size)
            except ConnectionError:
                return
            n, m = _HEADER.unpack(header)
            if len(inbuf) < n:
                inbuf = memoryview(bytearray(n))
            if len(outbuf) < m:
                outbuf = memoryview(bytearray(b"\x5a" * m))
            _recv_exact(sock, inbuf, n)
            sock.sendall(outbuf[:m])
    finally:
        sock.close()
        srv.close()


class WireFloor:
    """A connected loopback socket pair across two processes; ``round_trip(n, m)`` times one
    request of n bytes answered by m bytes."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_peer, args=(child,), daemon=True)
        self._proc.start()
        port = parent.recv()
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._out = memoryview(bytearray(0))
        self._in = memoryview(bytearray(0))

    def round_trip(self, n: int, m: int) -> float:
        if len(self._out) < _HEADER.size + n:
            self._out = memoryview(bytearray(b"\xa5" * (_HEADER.size + n)))
        if len(self._in) < m:
            self._in = memoryview(bytearray(m))
        _HEADER.pack_into(self._out, 0, n, m)
        start = time.perf_counter()
        self._sock.sendall(self._out[: _HEADER.size + n])
        _recv_exact(self._sock, self._in, m)
        return time.perf_counter() - start

    def median_ms(self, n: int, m: int, repeat: int = 11, warmup: int = 3) -> float:
        for _ in range(warmup):
            self.round_trip(n, m)
        return statistics.median(self.round_trip(n, m) for _ in range(repeat)) * 1e3

    def close(self) -> None:
        self._sock.close()
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.terminate()

    def __enter__(self) -> WireFloor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("request_bytes", type=int)
    p.add_argument("response_bytes", type=int)
    p.add_argument("--repeat", type=int, default=11)
    args = p.parse_args()
    with WireFloor() as wire:
        ms = wire.median_ms(args.request_bytes, args.response_bytes, args.repeat)
    total = args.request_bytes + args.response_bytes
    print(f"{args.request_bytes} B out + {args.response_bytes} B back over loopback TCP: median {ms:.3f} ms "
          f"({total / ms / 1e6:.2f} GB/s), {args.repeat} runs")


if __name__ == "__main__":
    main()
