"""Scale-out for 3_websocket_broadcast.py: several processes, one conversation, through Redis.

Used only with `--redis URL` (docs/scaling-out.md explains the design). Each process
appends what its clients say to a Redis Stream and delivers what it reads back, its own
messages included, so every client of every process sees one order. Stream entry ids
are the message ids, and the stream keeps the history: a process that loses Redis for a
while resumes after the last entry it delivered, and one that starts loads the history.
"""

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import sys

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

MESSAGES = "broadcast:messages"  # a stream of what clients said: the history
PRESENCE = "broadcast:presence"  # a stream of arrivals, departures and heartbeats
COUNTER = "broadcast:client-numbers"  # client numbers, unique across processes
KEEP = 1000  # entries each stream keeps at least, so a process that lags finds them
HEARTBEAT = 2  # seconds between "I'm alive, with these clients" entries
SILENT_LIMIT = 7  # seconds without a heartbeat before a process counts as gone
UNAVAILABLE = "broadcast unavailable: Redis is unreachable, try again soon"
# After a Redis restart the counter starts again at 0: lift it above every number in use.
LIFT_COUNTER = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], ARGV[1])
end"""


async def start(url, history, deliver, clients, timeout):
    """Connect, check that Redis does all we need, load the history; or exit in one sentence."""
    conversation = Conversation(url, history, deliver, clients, timeout)
    try:
        await conversation.prepare()
    except (RedisError, OSError, ValueError) as exc:
        why = str(exc).rstrip(".")
        sys.exit(f"Cannot use Redis at {url}: {why}. Check Redis, or run without --redis.")
    logging.info("sharing the conversation through Redis at %s", url)
    return conversation


class Conversation:
    """The same interface as the local Conversation in 3_websocket_broadcast.py."""

    def __init__(self, url, history, deliver, clients, timeout):
        # No retries inside redis-py: a retried XADD could add a message twice, and
        # relay() already retries, with backoff, what failed.
        self.redis = redis.from_url(
            url, socket_timeout=timeout, decode_responses=True, retry=Retry(NoBackoff(), 0)
        )
        self.history, self.deliver, self.clients = history, deliver, clients
        # Unique even if two containers share a host name and a process id.
        self.server = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.others = {}  # another process -> (its client numbers, when last heard)
        self.last = {MESSAGES: "0-0", PRESENCE: "$"}  # the last entry delivered from each
        self.outbox = asyncio.Queue()  # commands for the next pipeline
        self.stopping = asyncio.Event()  # set by close()
        self.available = False  # True while Redis answers
        self.tasks = []

    async def prepare(self):
        """Run every command once, load the history, then relay, write and beat."""
        await self.redis.ping()
        await self.lift_counter()
        await self.redis.incrby(COUNTER, 0)
        size = self.history.messages.maxlen
        for entry_id, fields in reversed(await self.redis.xrevrange(MESSAGES, count=size + 1)):
            if event := self.parse(MESSAGES, entry_id, fields):
                self.history.add(event)
            self.last[MESSAGES] = entry_id
        newest = await self.redis.xrevrange(PRESENCE, count=1)
        self.last[PRESENCE] = newest[0][0] if newest else "0-0"
        await self.redis.xadd(PRESENCE, self.entry(self.heartbeat_event()), maxlen=KEEP)
        await self.redis.xread(self.last, count=1)
        self.available = True
        for work in (self.relay, self.write, self.beat):
            self.tasks.append(asyncio.create_task(work()))

    # The interface the handler uses.

    async def client_number(self):
        """A number unique across processes, or None if Redis is unreachable."""
        try:
            return await self.run("incrby", COUNTER, 1)
        except RedisError as exc:
            logging.warning("refused a client: no client number from Redis (%s)", exc)
            return None

    async def publish(self, event):
        """Append an event to its stream; return None, or why it could not be."""
        stream = MESSAGES if event["type"] == "message" else PRESENCE
        try:
            await self.run("xadd", stream, self.entry(event), maxlen=self.keep(stream))
        except RedisError as exc:
            logging.warning("cannot write to Redis (%s)", exc)
            return UNAVAILABLE
        return None

    def online(self):
        """How many clients are connected, here and on every other live process."""
        return len(self.clients) + sum(len(clients) for clients, _ in self.others.values())

    async def close(self):
        # Stop each task between two Redis commands: redis-py can hang when cancelled
        # in the middle of one, and so would the process on its way out.
        relay, write, beat = self.tasks
        beat.cancel()  # it waits on a timer, or on write()
        self.outbox.put_nowait(None)  # write() stops after what it is sending
        self.stopping.set()  # relay() stops after its XREAD, within 0.5 s
        await asyncio.gather(relay, write, beat, return_exceptions=True)
        await self.redis.aclose()

    # Writing: one pipeline at a time carries every command waiting, in order.

    async def run(self, command, *args, **kwargs):
        """Run a Redis command in the next pipeline and return its result."""
        if not self.available:  # don't queue up attempts while Redis is down
            raise RedisError("Redis is unreachable")
        done = asyncio.get_running_loop().create_future()
        self.outbox.put_nowait((command, args, kwargs, done))
        return await done

    async def write(self):
        """Send everything run() queued, in one pipeline; stop at None, from close()."""
        stop = False
        while not stop:
            batch = [await self.outbox.get()]
            while not self.outbox.empty():
                batch.append(self.outbox.get_nowait())
            stop = None in batch
            batch = [item for item in batch if item is not None]
            pipe = self.redis.pipeline(transaction=False)
            for command, args, kwargs, _ in batch:
                getattr(pipe, command)(*args, **kwargs)
            try:
                results = await pipe.execute(raise_on_error=False) if batch else []
            except RedisError as exc:
                results = [exc] * len(batch)
            for (*_, done), result in zip(batch, results, strict=True):
                if done.done():  # its sender went away meanwhile
                    continue
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    # Reading: every entry of both streams, in order, for as long as the process runs.

    async def relay(self):
        """Deliver each new entry; if Redis goes away, retry with backoff, then resume."""
        delay = 1
        while not self.stopping.is_set():
            try:
                if not self.available:
                    await self.lift_counter()
                    self.available, delay = True, 1
                    logging.info("Redis is back: relaying the conversation again")
                for stream, entries in await self.redis.xread(self.last, block=500):
                    for entry_id, fields in entries:
                        self.last[stream] = entry_id  # resume after it, whatever happens
                        if event := self.parse(stream, entry_id, fields):
                            self.receive(event)
            except (RedisError, OSError) as exc:
                if self.available:
                    logging.warning("lost Redis (%s); retrying", str(exc).rstrip("."))
                self.available = False
                with contextlib.suppress(RedisError, OSError):  # no stale connections after
                    await self.redis.connection_pool.disconnect()
                with contextlib.suppress(TimeoutError):  # a pause that close() can cut short
                    await asyncio.wait_for(self.stopping.wait(), delay)
                delay = min(2 * delay, 30)

    def parse(self, stream, entry_id, fields):
        """The event in an entry, checked; None (and a log line) if it is malformed."""
        try:
            event = json.loads(fields["event"])
            if stream == MESSAGES:
                client, text = event["client"], event["text"]
                if not (isinstance(client, int) and isinstance(text, str)):
                    raise TypeError("client must be a number, text a string")
                return {"type": "message", "id": entry_id, "client": client, "text": text}
            server = str(event["server"])
            if event["type"] == "heartbeat":
                clients = set(event["clients"])
                if not all(isinstance(n, int) for n in clients):
                    raise TypeError("clients must be numbers")
                return {"type": "heartbeat", "server": server, "clients": clients}
            if event["type"] in ("joined", "left") and isinstance(event["client"], int):
                return {"type": event["type"], "server": server, "client": event["client"]}
            raise ValueError(f"unknown type {event['type']!r}")
        except (KeyError, TypeError, ValueError) as exc:
            logging.warning("skipped entry %s of %s (%s): %.200r", entry_id, stream, exc, fields)
            return None

    def receive(self, event):
        """Deliver an event here, and keep count of the other processes' clients."""
        server = event.pop("server", self.server)
        if event["type"] == "heartbeat":
            if server != self.server:
                self.heard(server, event["clients"])
        elif event["type"] == "message" or server == self.server:
            self.deliver(event)
        else:  # another process's "joined" or "left", unless its heartbeat told us already
            clients = self.others.get(server, (set(), 0))[0]
            joined = event["type"] == "joined"
            if (event["client"] in clients) != joined:
                (clients.add if joined else clients.discard)(event["client"])
                self.deliver(event)
            self.others[server] = (clients, asyncio.get_running_loop().time())

    def heard(self, server, clients):
        """What another process's heartbeat says: announce whoever came or went there."""
        before = self.others.get(server, (set(), 0))[0]
        self.others[server] = (clients, asyncio.get_running_loop().time())
        for client in sorted(clients - before):
            self.deliver({"type": "joined", "client": client})
        for client in sorted(before - clients):
            self.deliver({"type": "left", "client": client})

    # Heartbeats: who is connected here; forget the processes that went silent.

    async def beat(self):
        while True:
            await asyncio.sleep(HEARTBEAT)
            if self.available:
                event = self.heartbeat_event()
                with contextlib.suppress(RedisError):
                    await self.run("xadd", PRESENCE, self.entry(event), maxlen=KEEP)
            now = asyncio.get_running_loop().time()
            for server, (clients, heard) in list(self.others.items()):
                if now - heard > SILENT_LIMIT:  # killed, or cut off from Redis
                    del self.others[server]
                    if clients:
                        logging.warning("%s went silent; its %d clients left", server, len(clients))
                    for client in sorted(clients):
                        self.deliver({"type": "left", "client": client})

    def heartbeat_event(self):
        return {"type": "heartbeat", "clients": sorted(self.clients.values())}

    def entry(self, event):
        return {"event": json.dumps({**event, "server": self.server})}

    def keep(self, stream):
        """How many entries a stream keeps (about: Redis trims whole blocks of entries)."""
        return max(KEEP, self.history.messages.maxlen) if stream == MESSAGES else KEEP

    async def lift_counter(self):
        known = [*self.clients.values(), *(n for c, _ in self.others.values() for n in c)]
        await self.redis.eval(LIFT_COUNTER, 1, COUNTER, max(known, default=0))
