"""Open-model HTTP load driver (stdlib asyncio only).

Requests are sent on a fixed schedule (request i at start + i / rate) whatever the latency
of earlier ones: a slow or hung gateway does not slow the arrivals down, which is what makes
latency and error figures honest under faults (a closed-model loop would back off exactly
when things go wrong). Every run is bounded: a fixed number of requests, a per-request
timeout and a cap on requests in flight (arrivals past the cap are recorded as
`client_overload`, never silently dropped).

Only 127.0.0.1 is ever contacted (the stack's published ports).
"""

import asyncio
import json
import time

HOST = "127.0.0.1"


class Conn:
    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    def close(self):
        try:
            self.writer.close()
        except Exception:
            pass


class Pool:
    """Keep-alive connections to one published port."""

    def __init__(self, port):
        self.port = port
        self.idle = []

    async def get(self, fresh=False):
        if self.idle and not fresh:
            return self.idle.pop(), True
        r, w = await asyncio.open_connection(HOST, self.port)
        return Conn(r, w), False

    def put(self, conn):
        if len(self.idle) < 256:
            self.idle.append(conn)
        else:
            conn.close()

    def close(self):
        for c in self.idle:
            c.close()
        self.idle.clear()


async def _read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif status not in (204, 304):
        body = await reader.read()
        headers["connection"] = "close"
    return status, headers, body


async def http_request(pool, method, path, headers=None, body=None):
    """One request; retried once on a fresh connection when a reused keep-alive connection
    turns out to be dead before any response byte (what every HTTP client does)."""
    payload = b""
    hdrs = {"Host": f"{HOST}:{pool.port}", "User-Agent": "deltastream-chaos"}
    if body is not None:
        payload = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    hdrs["Content-Length"] = str(len(payload))
    hdrs.update(headers or {})
    raw = (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
           + "\r\n").encode() + payload
    for attempt in (0, 1):
        # The retry must not take another idle connection: after a burst the pool holds many,
        # and the server may have closed the older ones too (keep-alive idle limit).
        conn, reused = await pool.get(fresh=attempt > 0)
        try:
            conn.writer.write(raw)
            await conn.writer.drain()
            status, rh, rb = await _read_response(conn.reader)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            conn.close()
            if reused and attempt == 0:
                continue
            raise
        except BaseException:
            conn.close()
            raise
        if rh.get("connection", "").lower() == "close":
            conn.close()
        else:
            pool.put(conn)
        return status, rh, rb
    raise ConnectionError("unreachable")


def _reason(status, headers, body):
    if status < 400 or "json" not in headers.get("content-type", ""):
        return None
    try:
        return json.loads(body).get("reason")
    except Exception:
        return None


def arrivals(plan):
    """Every scheduled request as (t, request, targets), in time order.

    The main stream: the requests without a `rate` of their own, interleaved by weight, at
    `rate` req/s, or piecewise by `segments` ([{"from_s", "to_s", "rate"}], e.g. a demand spike
    in the middle of the run). A request with its own `rate` is a stream of its own at that
    fixed rate for the whole run (health probes, logins at a steady pace): a spike of the
    main stream does not multiply it.
    """
    duration = float(plan["duration_s"])
    default_targets = plan.get("targets", ["gateway-1"])
    slots, fixed = [], []
    for req in plan["requests"]:
        targets = req.get("targets") or ([req["target"]] if "target" in req else default_targets)
        if "rate" in req:
            fixed.append((req, targets))
        else:
            for _ in range(int(req.get("weight", 1))):
                slots.append((req, targets))
    out = []
    segments = plan.get("segments") or [{"from_s": 0.0, "to_s": duration, "rate": plan["rate"]}]
    k = 0
    for seg in segments:
        rate = float(seg["rate"])
        start, end = float(seg["from_s"]), min(float(seg["to_s"]), duration)
        if slots and rate > 0:
            for j in range(int(rate * max(0.0, end - start))):
                req, targets = slots[k % len(slots)]
                out.append((start + j / rate, req, targets))
                k += 1
    for req, targets in fixed:
        rate = float(req["rate"])
        for j in range(int(rate * duration)):
            out.append((j / rate, req, targets))
    out.sort(key=lambda a: a[0])
    return out


async def run_load(plan, ports, t0, on_tick=None):
    """Drives `plan` and returns one record per scheduled request.

    plan: {"rate": req/s, "duration_s": s, "timeout_s": s, "max_in_flight": n,
           "max_in_flight_per_target"?: n,
           "segments"?: [{"from_s", "to_s", "rate"}],
           "requests": [{"name", "path", "method"?, "headers"?, "body"?, "weight"?, "rate"?,
                         "target"? | "targets"?}], "targets": [service, ...]}
    ports: service name -> published port. t0: monotonic time that is t = 0 in the records.
    Requests are interleaved by weight (see `arrivals`), targets round-robin per request.
    """
    timeout = float(plan.get("timeout_s", 10))
    cap = int(plan.get("max_in_flight", 2000))
    # Per target as well (main stream): each request in flight is a connection, and through a
    # published port every connection also costs Docker's userland proxy six fds (two sockets
    # and a splice pipe per direction) against its 20000-fd limit; past it the proxy stops
    # accepting for good (see chaos/README.md).
    cap_per_target = int(plan.get("max_in_flight_per_target", cap))
    schedule = arrivals(plan)
    target_rr = {}
    pools = {}
    records = []
    in_flight = 0
    per_target = {}
    tasks = []

    async def one(i, req, target, t_sched):
        nonlocal in_flight
        rec = {"i": i, "t": round(t_sched, 4), "req": req["name"], "target": target,
               "status": 0, "lat_ms": None, "err": None, "x_cache": None, "reason": None,
               "retry_after": None, "attempts": None}
        records.append(rec)
        # The per-target cap bounds the main stream only: probes and other fixed-rate streams
        # are few, and a probe must reach a flooded replica to measure it.
        capped = "rate" not in req
        if in_flight >= cap or (capped and per_target.get(target, 0) >= cap_per_target):
            rec["err"] = "client_overload"
            return
        in_flight += 1
        if capped:
            per_target[target] = per_target.get(target, 0) + 1
        pool = pools.setdefault(target, Pool(ports[target]))
        start = time.monotonic()
        try:
            status, h, b = await asyncio.wait_for(
                http_request(pool, req.get("method", "GET"), req["path"].replace("{i}", str(i)),
                             req.get("headers"), req.get("body")), timeout)
            rec["status"] = status
            rec["x_cache"] = h.get("x-cache")
            rec["retry_after"] = h.get("retry-after")
            rec["attempts"] = h.get("x-upstream-attempts")
            rec["reason"] = _reason(status, h, b)
        except asyncio.TimeoutError:
            rec["err"] = "client_timeout"
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            rec["err"] = type(e).__name__
        except Exception as e:  # a malformed answer is a finding, not a crash
            rec["err"] = f"bad_response:{type(e).__name__}"
        finally:
            rec["lat_ms"] = round((time.monotonic() - start) * 1000, 3)
            in_flight -= 1
            if capped:
                per_target[target] -= 1

    for i, (t_plan, req, targets) in enumerate(schedule):
        delay = t0 + t_plan - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        k = target_rr.get(id(req), 0)
        target_rr[id(req)] = k + 1
        target = targets[k % len(targets)]
        tasks.append(asyncio.create_task(one(i, req, target, time.monotonic() - t0)))
        if on_tick:
            on_tick(i)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    for p in pools.values():
        p.close()
    records.sort(key=lambda r: r["i"])
    return records


async def request_once(port, method, path, headers=None, body=None, timeout=5.0):
    """A single request outside any load run (setup steps, steady-state checks)."""
    pool = Pool(port)
    try:
        status, h, b = await asyncio.wait_for(http_request(pool, method, path, headers, body), timeout)
        return status, h, b
    finally:
        pool.close()
