"""How fast one --redis process publishes: a lock and one XADD per event, or a pipeline.

The first design sent one XADD per event behind a lock; broadcast_redis.py's writer sends
whatever is queued in one pipeline. The relay reads every message back, as a server does.

Run: python bench/redis_publish.py        (about 30 s; needs redis-server; --quick: a smoke run)
"""

import argparse
import asyncio
import secrets
import statistics
import sys
import time

from common import ROOT, redis_server

sys.path.insert(0, str(ROOT))
import broadcast_redis  # the module next to the scripts, found through ROOT


class History:
    """What the module asks of the script's History: its size, and somewhere to add."""

    size, known, latest = 100, None, None

    def add(self, event):
        pass


class Locked(broadcast_redis.Conversation):
    """The first design: one XADD per event, one at a time."""

    async def publish(self, event):
        event = {**event, "time": 0, "uid": secrets.token_hex(8)}
        async with self.lock:
            await self.redis.xadd(self.MESSAGES, self.entry(event), maxlen=1000)


async def rate(kind, url, senders, each):
    delivered = []
    conversation = kind(url, History(), delivered.append, {})
    conversation.lock = asyncio.Lock()
    await conversation.prepare()

    async def send(client):
        for _ in range(each):
            event = {"type": "message", "client": client, "text": "x" * 40}
            assert await conversation.publish(event) is None

    t0 = time.perf_counter()
    await asyncio.gather(*(send(i) for i in range(senders)))
    while len(delivered) < senders * each:  # until all are read back
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - t0
    await conversation.close()
    return senders * each / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small run: a smoke test")
    args = parser.parse_args()
    runs, total = (1, 100) if args.quick else (3, 3000)
    with redis_server() as url:
        if url is None:
            sys.exit(
                "This benchmark needs redis-server (Debian/Ubuntu: apt-get install redis-server)."
            )
        print(f"Events published and read back per second; median of {runs} runs (min-max)\n")
        print("senders | one XADD per event, behind a lock | the pipelined writer")
        print("------- | --------------------------------- | --------------------------")
        for senders in (1, 10, 100) if args.quick else (1, 10, 100, 1000):
            each = max(3, total // senders)
            cells = []
            for kind in (Locked, broadcast_redis.Conversation):
                rates = [asyncio.run(rate(kind, url, senders, each)) for _ in range(runs)]
                median = statistics.median(rates)
                cells.append(f"{median:,.0f}/s ({min(rates):,.0f}-{max(rates):,.0f})")
            print(f"{senders:>7,} | {cells[0]:<33} | {cells[1]}")


if __name__ == "__main__":
    main()
