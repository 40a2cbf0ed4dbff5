"""A TCP relay that can lose the network silently, for the silent-network-loss scenario.

`BlackHoleRelay` listens on 127.0.0.1 and forwards every connection to a target (PostgreSQL). `black_hole()`
makes it stop forwarding at once WITHOUT closing anything: bytes already on their way are dropped, sockets stay
open at both ends, new connections are accepted by the kernel and then ignored. To the client and the server
this is a cable cut: no FIN, no RST, just silence. `resume()` forwards the connections made from then on; those
caught by the black hole stay silent (as after a real outage, where each end has given up on them) until
`close()`, so the server keeps their sessions, and whatever locks or transactions they hold, for as long as it
would in production.

`black_hole(inside_a_transaction=True)` waits for the worst moment: the relay reads PostgreSQL's messages from
the server and cuts everything as soon as one connection is inside a transaction (a ReadyForQuery with status
`T` or `E`, held back from the client), so that the server is left with a transaction whose client went silent.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

CHUNK = 65536


SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
"""What a client sends first to ask for TLS; the server answers one byte, `S` (yes) or `N` (no)."""
MAX_MESSAGE = 1 << 30


@dataclass
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    asked_for_tls: bool | None = None
    """Whether the client's first bytes were an SSLRequest (None: not seen yet)."""


class BlackHoleRelay:
    """`async with BlackHoleRelay(host, port) as relay:` connect to `relay.port` on 127.0.0.1."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._live: list[_Link] = []
        self._stranded: list[_Link] = []
        self._holed = False
        self._armed = False
        self.holed = asyncio.Event()
        """Set when a black hole begins (at once, or at the moment a `black_hole(inside_a_transaction=True)`
        waited for)."""
        self.port = 0
        self.forwarded_connections = 0
        """Connections forwarded to the target since the start."""
        self.stranded_connections = 0
        """Connections caught by a black hole (open when it began, or made while it lasted)."""

    @property
    def black_holed(self) -> bool:
        return self._holed

    async def __aenter__(self) -> BlackHoleRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def black_hole(self, *, inside_a_transaction: bool = False) -> None:
        """Stop forwarding on every connection, closing none of them: now, or (`inside_a_transaction`) as soon as
        one connection is inside a transaction at the server; `holed` is set when it happens."""
        if inside_a_transaction:
            self._armed = True
            return
        self._armed = False
        self._holed = True
        self.holed.set()
        for link in self._live:
            for pump in link.pumps:
                pump.cancel()
            self._strand(link)
        self._live.clear()

    def resume(self) -> None:
        """Forward the connections made from now on (those caught by the black hole stay silent)."""
        self._holed = False
        self.holed.clear()

    async def close(self) -> None:
        """Stop listening and close every connection, live or stranded."""
        if self._server is not None:
            self._server.close()
        links = self._live + self._stranded
        self._live, self._stranded = [], []
        pumps = [pump for link in links for pump in link.pumps]
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for link in links:
            for writer in (link.client, link.server):
                if writer is not None:
                    writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _strand(self, link: _Link) -> None:
        self._stranded.append(link)
        self.stranded_connections += 1

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        link = _Link(client_writer)
        if self._holed:
            self._strand(link)  # accepted by the kernel, never answered
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self._target)
        except OSError:
            client_writer.transport.abort()  # the target refuses: so does the relay
            return
        link.server = server_writer
        if self._holed:  # the black hole began while connecting
            self._strand(link)
            return
        self.forwarded_connections += 1
        link.pumps = [
            asyncio.create_task(self._pump(client_reader, server_writer, link, from_server=False)),
            asyncio.create_task(self._pump(server_reader, client_writer, link, from_server=True)),
        ]
        self._live.append(link)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, *, from_server: bool
    ) -> None:
        """Copy one direction until end of stream, then end the other side's stream too. From the server, the
        bytes go through `_messages` (which holds back the moment an armed black hole waits for)."""
        pending = bytearray() if from_server else None
        try:
            while data := await reader.read(CHUNK):
                if link.asked_for_tls is None and not from_server:
                    link.asked_for_tls = data.startswith(SSL_REQUEST)
                if pending is not None:
                    pending += data
                    complete, cut = self._messages(link, pending)
                    if cut:
                        writer.write(complete or b"")
                        self.black_hole()  # cancels this pump too: nothing more is forwarded
                        return
                    if complete is None:  # not the PostgreSQL protocol in clear (TLS): forward as it comes
                        complete, pending = bytes(pending), None
                    data = complete
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        if link in self._live:  # one end closed (or reset): close the link, as a router passes the FIN on
            self._live.remove(link)
            for end in (link.client, link.server):
                if end is not None:
                    with contextlib.suppress(Exception):
                        end.transport.abort()

    def _messages(self, link: _Link, pending: bytearray) -> tuple[bytes | None, bool]:
        """Take the complete server messages off the front of `pending`: (the bytes to forward, whether an
        armed black hole must begin now, before the ReadyForQuery that opened it). None to forward: the stream
        cannot be read (TLS)."""
        out = bytearray()
        answer = bytes(pending[:1])
        if link.asked_for_tls and answer in (b"N", b"S"):
            link.asked_for_tls = False
            if answer == b"S":
                pending[:0] = out
                return None, False
            out += pending[:1]
            del pending[:1]
        while len(pending) >= 5:
            length = int.from_bytes(pending[1:5], "big")
            if not 4 <= length < MAX_MESSAGE:
                pending[:0] = out
                return None, False
            if len(pending) < 1 + length:
                break
            message = bytes(pending[: 1 + length])
            del pending[: 1 + length]
            if self._armed and message[:1] == b"Z" and message[5:6] in (b"T", b"E"):
                return bytes(out), True
            out += message
        return bytes(out), False
