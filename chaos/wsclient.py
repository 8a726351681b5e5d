"""WebSocket subscribers for the chaos suite (stdlib asyncio only, RFC 6455 client side).

A chaos run needs to see exactly what a subscriber sees when something dies: the handshake's
status and body when the gateway refuses the upgrade (a JSON 503 before any upgrade), the
close code when the connection is closed, a bare end of stream when a process vanishes, and
the time of every tick. A library client hides some of that (and would be one more thing to
install in CI), so this is the small subset the suite needs: text frames out (masked), text /
close / ping frames in, no extensions, no fragmented messages (the socket service sends none).

Only 127.0.0.1 is ever contacted (the stack's published ports).
"""

import asyncio
import base64
import json
import os
import struct
import time

HOST = "127.0.0.1"


class WebSocket:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    async def send_text(self, text):
        await self._send(0x1, text.encode())

    async def _send(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)
        await self.writer.drain()

    async def recv(self):
        """("text", str) | ("close", code or None); raises IncompleteReadError / ConnectionError
        when the stream ends without a close frame."""
        while True:
            b0, b1 = await self.reader.readexactly(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            mask = await self.reader.readexactly(4) if b1 & 0x80 else None
            payload = await self.reader.readexactly(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x1:
                return "text", payload.decode("utf-8", "replace")
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                try:
                    await self._send(0x8, payload[:2])  # echo the close, as RFC 6455 asks
                except Exception:
                    pass
                return "close", code
            if opcode == 0x9:
                await self._send(0xA, payload)
            # pong, binary, continuation: not used by the socket service; skipped

    async def close(self, code=1000):
        try:
            await self._send(0x8, struct.pack("!H", code))
        except Exception:
            pass
        self.close_now()

    def close_now(self):
        try:
            self.writer.close()
        except Exception:
            pass


async def handshake(port, path, headers=None):
    """(status, response headers, body, WebSocket or None). A refused upgrade is read to the
    end of its body and the connection closed."""
    reader, writer = await asyncio.open_connection(HOST, port)
    key = base64.b64encode(os.urandom(16)).decode()
    hdrs = {"Host": f"{HOST}:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13",
            "User-Agent": "deltastream-chaos"}
    hdrs.update(headers or {})
    writer.write((f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
                  + "\r\n").encode())
    await writer.drain()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        rh = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                rh[k.strip().lower()] = v.strip()
        if status == 101:
            return status, rh, b"", WebSocket(reader, writer)
        body = b""
        if "content-length" in rh:
            body = await reader.readexactly(int(rh["content-length"]))
        writer.close()
        return status, rh, body, None
    except BaseException:
        writer.close()
        raise


async def subscriber(spec, sub_id, ports, t0, end_t):
    """One subscriber for the whole load: connect, subscribe, record ticks; when the
    connection ends, reconnect after `reconnect_delay_s` (to the next of `targets` when
    `failover`), until `end_t` (seconds from t0). Returns its record: every event with its
    time in seconds from t0:
      connected {target, lat_ms}    rejected {target, status, lat_ms, json, reason}
      connect_error {target, err}   tick {target}
    (the three kinds of upgrade attempt are timed from the attempt's start, the rest when seen)
      end {target, code (None: no close frame), how: close|eof|reset}
    """
    targets = spec["targets"]
    delay = float(spec.get("reconnect_delay_s", 0.25))
    timeout = float(spec.get("connect_timeout_s", 2.0))
    products = spec.get("products", ["NIFTY"])
    events = []
    rec = {"group": spec["group"], "id": sub_id, "events": events}
    now = lambda: time.monotonic() - t0
    ti = 0
    while now() < end_t:
        target = targets[ti % len(targets)]
        started = time.monotonic()
        t_attempt = round(now(), 4)  # attempts are timed from their start
        try:
            status, rh, body, ws = await asyncio.wait_for(
                handshake(ports[target], spec.get("path", "/ws"), spec.get("headers")), timeout)
        except Exception as e:
            events.append({"t": t_attempt, "kind": "connect_error", "target": target,
                           "err": type(e).__name__, "lat_ms": round((time.monotonic() - started) * 1000, 3)})
            if spec.get("failover"):
                ti += 1
            await asyncio.sleep(delay)
            continue
        lat = round((time.monotonic() - started) * 1000, 3)
        if ws is None:
            reason, is_json = None, "json" in rh.get("content-type", "")
            if is_json:
                try:
                    reason = json.loads(body).get("reason")
                except Exception:
                    is_json = False
            events.append({"t": t_attempt, "kind": "rejected", "target": target, "status": status,
                           "lat_ms": lat, "json": is_json, "reason": reason})
            await asyncio.sleep(delay)
            continue
        events.append({"t": t_attempt, "kind": "connected", "target": target, "lat_ms": lat})
        how, code = None, None
        try:
            await ws.send_text(json.dumps({"action": "subscribe", "products": products}))
            while True:
                left = end_t - now()
                if left <= 0:
                    break
                try:
                    kind, data = await asyncio.wait_for(ws.recv(), left)
                except asyncio.TimeoutError:
                    break
                if kind == "close":
                    how, code = "close", data
                    break
                try:
                    msg = json.loads(data)
                except ValueError:
                    continue
                if msg.get("type") == "tick":
                    events.append({"t": round(now(), 4), "kind": "tick", "target": target})
        except asyncio.IncompleteReadError:
            how = "eof"
        except (ConnectionError, OSError):
            how = "reset"
        if how is None:  # the load is over: a clean goodbye
            await ws.close()
            break
        ws.close_now()
        events.append({"t": round(now(), 4), "kind": "end", "target": target, "code": code, "how": how})
        if spec.get("failover"):
            ti += 1
        await asyncio.sleep(delay)
    return rec


async def run_subscribers(specs, ports, t0, end_t):
    """Every subscriber of every group, started together (spread over 100 ms)."""
    tasks = []
    for spec in specs:
        for k in range(int(spec["count"])):
            async def one(spec=spec, k=k):
                await asyncio.sleep(k * 0.1 / max(1, int(spec["count"])))
                return await subscriber(spec, f"{spec['group']}-{k}", ports, t0, end_t)
            tasks.append(asyncio.create_task(one()))
    return list(await asyncio.gather(*tasks))
