"""An HTTP/3 server built on aioquic, run by sockhold's tests on the UDP socket it inherits.

It takes the socket on fd 3 (LISTEN_FDS / LISTEN_PID, the systemd socket-activation protocol),
serves HTTP/3 on it with aioquic's own QuicServer (the protocol aioquic's serve() creates, here
on an existing socket instead of one it binds), answers every request with a small text body
"pid=PID generation=GEN" (SOCKHOLD_GENERATION), sends READY=1 to $NOTIFY_SOCKET, and exits at
once on SIGTERM, as most UDP servers do.

Usage: h3_server.py --cert CERT.pem --key KEY.pem
"""

import argparse
import asyncio
import os
import signal
import socket
import sys

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated, QuicEvent

PID = os.getpid()
GENERATION = os.environ.get("SOCKHOLD_GENERATION", "")


class H3Server(QuicConnectionProtocol):
    """One QUIC connection: answers every HTTP/3 request with the pid and generation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._http = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._http = H3Connection(self._quic)
        if self._http is None:
            return
        for http_event in self._http.handle_event(event):
            if isinstance(http_event, HeadersReceived):
                body = f"pid={PID} generation={GENERATION}\n".encode()
                self._http.send_headers(
                    stream_id=http_event.stream_id,
                    headers=[
                        (b":status", b"200"),
                        (b"content-type", b"text/plain"),
                        (b"content-length", str(len(body)).encode()),
                        (b"x-pid", str(PID).encode()),
                    ],
                )
                self._http.send_data(stream_id=http_event.stream_id, data=body, end_stream=True)
        self.transmit()


def inherited_socket() -> socket.socket:
    if os.environ.get("LISTEN_PID") != str(PID) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit("h3_server: needs a UDP socket on fd 3 (LISTEN_FDS, LISTEN_PID)")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sock = socket.socket(fileno=3)
    if sock.type != socket.SOCK_DGRAM:
        sys.exit(f"h3_server: fd 3 is not a datagram socket ({sock.type!r})")
    return sock


def report(event):
    """One JSON line on stdout in a single write: generations share the pipe, and print()'s
    separate writes of text and newline would interleave with another process's line."""
    os.write(1, f'{{"event":"{event}","pid":{PID},"generation":"{GENERATION}"}}\n'.encode())


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), path)


async def main() -> None:
    parser = argparse.ArgumentParser(description="HTTP/3 on the inherited UDP socket fd 3")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()

    configuration = QuicConfiguration(alpn_protocols=H3_ALPN, is_client=False)
    configuration.load_cert_chain(args.cert, args.key)
    loop = asyncio.get_running_loop()
    # asyncio makes the socket non-blocking: under a shared socket (no steer=flow) that flag is
    # the open file description's, which every generation of this same server shares alike.
    transport, _ = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=configuration, create_protocol=H3Server),
        sock=inherited_socket(),
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    notify("READY=1")
    report("ready")
    await stop.wait()
    # At once, like most UDP servers: no goodbye to the clients.
    report("exit")
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
