#!/usr/bin/env python3
"""Subscribe to DeltaStream ticks over WebSocket, print a few, close.

    scripts/ws-client.py [URL] [PRODUCT ...] [--count N] [--token TOKEN]
    scripts/ws-client.py ws://localhost:8000/ws NIFTY BANKNIFTY --count 5 --token "$TOKEN"
"""
import argparse, asyncio, json, sys

try:
    import websockets
except ImportError:
    sys.exit("needs the websockets package: python3 -m pip install websockets")

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("url", nargs="?", default="ws://localhost:8000/ws")
p.add_argument("products", nargs="*", default=["NIFTY"])
p.add_argument("--count", type=int, default=10, help="ticks to print before closing")
p.add_argument("--token", help="sent as Authorization: Bearer TOKEN")
args = p.parse_args()


async def main():
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    # websockets 14 renamed `extra_headers`; distributions still ship older releases.
    new_api = int(websockets.__version__.split(".")[0]) >= 14
    option = "additional_headers" if new_api else "extra_headers"
    async with websockets.connect(args.url, **{option: headers}) as ws:
        await ws.send(json.dumps({"action": "subscribe", "products": args.products}))
        ticks = 0
        while ticks < args.count:
            message = await ws.recv()
            print(message)
            ticks += json.loads(message).get("type") == "tick"


asyncio.run(main())
