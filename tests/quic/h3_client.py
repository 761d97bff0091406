"""Long-lived HTTP/3 connections for sockhold's tests, built on aioquic.

Opens K QUIC connections (each from a UDP socket of its own, so a flow of its own) to
127.0.0.1:PORT and does `GET /` on each every INTERVAL until its stdin reaches end of file (the
test closes it). Prints JSON lines on stdout: `connected` (conn), `request` (conn, ok, and pid
and generation from the answer, or error), and at the end `summary` (requests, failures, the
broken connections, the pids that answered each connection). A connection breaks on its first
failed request (no answer within --timeout, or the connection closed) and does no more requests.
Exits 0 when no connection broke, 1 otherwise.

Usage: h3_client.py --port PORT --ca CERT.pem [--connections K] [--interval SECONDS]
"""

import argparse
import asyncio
import json
import os
import sys
import time

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent


def say(event: str, **fields) -> None:
    fields["event"] = event
    print(json.dumps(fields), flush=True)


class H3Client(QuicConnectionProtocol):
    """A QUIC connection that does HTTP/3 GET requests, one stream each."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._pending: dict[int, tuple[asyncio.Future, list, bytearray]] = {}
        self.terminated: str | None = None

    async def get(self, authority: str) -> tuple[int, bytes]:
        stream_id = self._quic.get_next_available_stream_id()
        waiter = self._loop.create_future()
        self._pending[stream_id] = (waiter, [], bytearray())
        self._http.send_headers(
            stream_id=stream_id,
            headers=[
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", b"/"),
            ],
            end_stream=True,
        )
        self.transmit()
        return await waiter

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.terminated = f"connection closed: {event.reason_phrase or event.error_code}"
            for waiter, _, _ in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError(self.terminated))
            return
        for http_event in self._http.handle_event(event):
            entry = self._pending.get(http_event.stream_id)
            if entry is None:
                continue
            waiter, headers, body = entry
            if isinstance(http_event, HeadersReceived):
                headers.extend(http_event.headers)
            elif isinstance(http_event, DataReceived):
                body.extend(http_event.data)
            if getattr(http_event, "stream_ended", False):
                del self._pending[http_event.stream_id]
                status = int(dict(headers).get(b":status", b"0"))
                if not waiter.done():
                    waiter.set_result((status, bytes(body)))


async def one_connection(conn: int, args, configuration, stop: asyncio.Event, tally) -> None:
    try:
        async with connect(
            "127.0.0.1", args.port, configuration=configuration, create_protocol=H3Client
        ) as client:
            say("connected", conn=conn)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    status, body = await asyncio.wait_for(
                        client.get(f"127.0.0.1:{args.port}"), args.timeout
                    )
                    if status != 200:
                        raise ConnectionError(f"status {status}: {body!r}")
                    fields = dict(kv.split("=", 1) for kv in body.decode().split())
                    pid = int(fields["pid"])
                except Exception as e:  # noqa: BLE001 - every failure breaks the connection
                    error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    say("request", conn=conn, ok=False, error=error)
                    tally["failures"] += 1
                    tally["broken"].append(conn)
                    return
                tally["requests"] += 1
                tally["pids"].setdefault(conn, [])
                if pid not in tally["pids"][conn]:
                    tally["pids"][conn].append(pid)
                ms = round((time.monotonic() - started) * 1000, 1)
                say("request", conn=conn, ok=True, pid=pid, generation=fields.get("generation"), ms=ms)
                try:
                    await asyncio.wait_for(stop.wait(), args.interval)
                except asyncio.TimeoutError:
                    pass
    except Exception as e:  # noqa: BLE001 - a connection that could not be made is broken too
        say("request", conn=conn, ok=False, error=f"connect: {type(e).__name__}: {e}")
        tally["failures"] += 1
        tally["broken"].append(conn)


async def main() -> int:
    parser = argparse.ArgumentParser(description="long-lived HTTP/3 connections")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True, help="the server's (self-signed) certificate")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()

    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    configuration.load_verify_locations(args.ca)
    configuration.server_name = "localhost"
    configuration.idle_timeout = 60.0

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    tally = {"requests": 0, "failures": 0, "broken": [], "pids": {}}
    await asyncio.gather(
        *(one_connection(i, args, configuration, stop, tally) for i in range(args.connections))
    )
    say("summary", **tally)
    return 1 if tally["broken"] else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
