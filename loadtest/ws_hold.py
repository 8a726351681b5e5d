#!/usr/bin/env python3
"""Hold many idle WebSocket connections open, in steps, for loadtest/ws-memory.

    loadtest/ws_hold.py ws://127.0.0.1:8000/ws 1000 5000 10000

Opens connections until STEP are open, prints `holding N failed F`, then waits for a line on
stdin before the next step; after the last step (or on `close`) it sends every connection a
close frame (1000), waits for the replies and prints `closed N replied R`. An idle client
still answers pings, so the gateway's idle timeout (pings after half of it) does not close it.

Raw sockets on asyncio rather than a WebSocket library: a connection here is a transport and a
few bytes of state, so 10,000 of them fit in one small process and the holder's own memory
and CPU stay out of the way. Only 127.0.0.1.
"""
import asyncio
import base64
import os
import struct
import sys
from urllib.parse import urlsplit

# Handshakes in flight at once: a burst of 10,000 would mostly measure the accept queue.
OPENING_AT_ONCE = 64
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 10.0


def client_frame(opcode, payload=b""):
    """A masked, final frame (clients must mask)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    else:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    return head + mask + masked


class Holder(asyncio.Protocol):
    """One idle connection: handshake, then answer pings and notice closes."""

    def __init__(self, request):
        self.request = request
        self.buffer = b""
        self.upgraded = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.transport = None
        self.close_sent = False
        self.close_replied = False

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data):
        self.buffer += data
        if not self.upgraded.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self.upgraded.set_exception(RuntimeError(status.decode(errors="replace")))
                self.transport.close()
                return
            self.upgraded.set_result(True)
        self.read_frames()

    def read_frames(self):
        while len(self.buffer) >= 2:
            first, second = self.buffer[0], self.buffer[1]
            opcode, length, at = first & 0x0F, second & 0x7F, 2
            if length == 126:
                if len(self.buffer) < 4:
                    return
                (length,) = struct.unpack("!H", self.buffer[2:4])
                at = 4
            elif length == 127:
                if len(self.buffer) < 10:
                    return
                (length,) = struct.unpack("!Q", self.buffer[2:10])
                at = 10
            if len(self.buffer) < at + length:
                return
            payload, self.buffer = self.buffer[at:at + length], self.buffer[at + length:]
            if opcode == 0x9:  # ping
                self.transport.write(client_frame(0xA, payload))
            elif opcode == 0x8:  # close
                if self.close_sent:
                    self.close_replied = True
                else:
                    self.transport.write(client_frame(0x8, payload[:2]))
                self.transport.close()

    def connection_lost(self, exc):
        if not self.upgraded.done():
            self.upgraded.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(True)

    def close(self):
        self.close_sent = True
        self.transport.write(client_frame(0x8, struct.pack("!H", 1000)))


async def open_one(host, port, request, failures):
    loop = asyncio.get_running_loop()
    try:
        _, holder = await asyncio.wait_for(
            loop.create_connection(lambda: Holder(request), host, port), HANDSHAKE_TIMEOUT)
        await asyncio.wait_for(holder.upgraded, HANDSHAKE_TIMEOUT)
        return holder
    except Exception as err:  # noqa: BLE001 - every failure is counted by its kind
        reason = f"{type(err).__name__}: {err}"[:80]
        failures[reason] = failures.get(reason, 0) + 1
        return None


async def main():
    url = urlsplit(sys.argv[1])
    steps = [int(step) for step in sys.argv[2:]]
    host, port = url.hostname, url.port or 80
    if host not in ("127.0.0.1", "localhost"):
        sys.exit("only loopback targets")
    path = url.path or "/"
    held, failures = [], {}
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for step in steps:
        gate = asyncio.Semaphore(OPENING_AT_ONCE)

        def request():
            key = base64.b64encode(os.urandom(16)).decode()
            return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    f"Sec-WebSocket-Version: 13\r\n\r\n").encode()

        async def gated():
            async with gate:
                return await open_one(host, port, request(), failures)

        # Connections that closed while held (idle timeout, server gone) are not counted.
        held = [h for h in held if not h.closed.done()]
        opened = await asyncio.gather(*(gated() for _ in range(max(0, step - len(held)))))
        held += [h for h in opened if h is not None]
        failed = sum(failures.values())
        detail = "; ".join(f"{n}x {reason}" for reason, n in failures.items())
        print(f"holding {len(held)} failed {failed} {detail}", flush=True)
        line = (await reader.readline()).decode().strip()
        if line != "next":
            break
    held = [h for h in held if not h.closed.done()]
    for holder in held:
        holder.close()
    if held:
        await asyncio.wait([h.closed for h in held], timeout=CLOSE_TIMEOUT)
    for holder in held:
        if not holder.closed.done():
            holder.transport.abort()
    replied = sum(h.close_replied for h in held)
    print(f"closed {len(held)} replied {replied}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
