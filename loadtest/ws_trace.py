#!/usr/bin/env python3
"""The gateway's own part of a tick's delivery, from a packet capture on loopback.

    loadtest/ws_trace.py CAPTURE.pcap SOCKET_PORT GATEWAY_PORT

The capture (tcpdump -i lo) holds both legs of every relayed subscription: the socket service
sending a tick to the gateway's upstream connection, and the gateway sending the same tick on
to its client. Each leg's time is when the segment crossed loopback, in the kernel, with
microsecond resolution, so the difference is the gateway's relay (wake-up, read, decode,
encode, write) and nothing of the load generator's or the service's own queueing.

Pairing the legs: the ticks of one product in one batch are identical on every connection,
so a client connection is matched to its upstream connection by order of opening among the
connections of the same product (the gateway opens the upstream connection during the
client's handshake). Open the subscriptions one at a time (ws.js with PER_VU=SUBSCRIBERS and a
ramp) so that order is unambiguous.
"""
import struct
import sys
import json
from collections import defaultdict


def packets(path):
    """(timestamp s, src port, dst port, flags, seq, payload) of each IPv4 TCP packet."""
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    if magic in (0xA1B2C3D4, 0xA1B23C4D):
        endian = "<"
    else:
        endian = ">"
        magic = struct.unpack(">I", data[:4])[0]
    nano = magic == 0xA1B23C4D
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    link_len = {1: 14, 113: 16, 276: 20, 0: 4, 101: 0}.get(linktype)
    if link_len is None:
        sys.exit(f"unsupported link type {linktype}")
    at = 24
    while at + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack(endian + "IIII", data[at:at + 16])
        frame = data[at + 16:at + 16 + caplen]
        at += 16 + caplen
        ts = sec + frac / (1e9 if nano else 1e6)
        ip = frame[link_len:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[ihl:total]
        if len(tcp) < 20:
            continue
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        offset = (tcp[12] >> 4) * 4
        yield ts, sport, dport, tcp[13], seq, tcp[offset:]


class Stream:
    """One direction of one connection: reassembles bytes and cuts WebSocket frames."""

    def __init__(self):
        self.next_seq = None
        self.buffer = b""
        self.head_done = False

    def feed(self, seq, payload):
        if self.next_seq is None:
            self.next_seq = seq
        if seq + len(payload) <= self.next_seq:
            return []  # a copy of what we have
        if seq > self.next_seq:
            # A gap (the capture dropped or cut a packet): start over from here. Segments of
            # these small messages start on frame boundaries; anything else fails to parse
            # as a tick below and is skipped.
            self.buffer, self.next_seq, self.head_done = b"", seq, True
        payload = payload[self.next_seq - seq:]
        self.next_seq += len(payload)
        self.buffer += payload
        if not self.head_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return []
            self.buffer, self.head_done = self.buffer[end + 4:], True
        frames = []
        while len(self.buffer) >= 2:
            opcode, length, at = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
            masked = self.buffer[1] & 0x80
            if length == 126:
                if len(self.buffer) < 4:
                    break
                length, at = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif length == 127:
                if len(self.buffer) < 10:
                    break
                length, at = struct.unpack("!Q", self.buffer[2:10])[0], 10
            if masked:
                at += 4
            if len(self.buffer) < at + length:
                break
            frames.append((opcode, self.buffer[at:at + length]))
            self.buffer = self.buffer[at + length:]
        return frames


def main():
    path, socket_port, gateway_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    opened = {"up": {}, "client": {}}       # connection (its client-side port) -> SYN time
    streams = {}
    product_of = {"up": {}, "client": {}}
    sent = {"up": defaultdict(dict), "client": defaultdict(dict)}  # conn -> tick key -> time
    for ts, sport, dport, flags, seq, payload in packets(path):
        syn, ack = flags & 0x02, flags & 0x10
        if syn and not ack:
            side = "up" if dport == socket_port else "client" if dport == gateway_port else None
            if side:
                opened[side].setdefault(sport, ts)
            continue
        if sport == socket_port:
            side, conn = "up", dport
        elif sport == gateway_port:
            side, conn = "client", dport
        else:
            continue
        if not payload:
            continue
        stream = streams.setdefault((side, conn), Stream())
        for opcode, body in stream.feed(seq, payload):
            if opcode != 1:
                continue
            try:
                message = json.loads(body)
            except ValueError:
                continue
            if message.get("type") != "tick":
                continue
            key = (message["product"], message["emitted_ms"])
            product_of[side].setdefault(conn, message["product"])
            sent[side][conn].setdefault(key, ts)

    deltas, unmatched_conns = [], 0
    products = set(product_of["up"].values()) | set(product_of["client"].values())
    for product in sorted(products):
        order = lambda side: sorted(
            (opened[side].get(conn, float("inf")), conn)
            for conn, p in product_of[side].items() if p == product)
        ups, clients = order("up"), order("client")
        unmatched_conns += abs(len(ups) - len(clients))
        for (_, up), (_, client) in zip(ups, clients):
            for key, t_client in sent["client"][client].items():
                t_up = sent["up"][up].get(key)
                if t_up is not None:
                    deltas.append((t_client - t_up) * 1000)
    if not deltas:
        sys.exit("no tick seen on both legs")
    deltas.sort()
    pick = lambda q: deltas[min(len(deltas) - 1, int(q * len(deltas)))]
    negative = sum(d < 0 for d in deltas)
    print(json.dumps({
        "pairs": len(deltas),
        "connections_up": len(product_of["up"]),
        "connections_client": len(product_of["client"]),
        "unmatched_connections": unmatched_conns,
        "negative": negative,
        "p50_ms": round(pick(0.50), 3),
        "p90_ms": round(pick(0.90), 3),
        "p99_ms": round(pick(0.99), 3),
        "p999_ms": round(pick(0.999), 3),
        "max_ms": round(deltas[-1], 3),
    }))


if __name__ == "__main__":
    main()
