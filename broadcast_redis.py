"""Scale-out for 3_websocket_broadcast.py: several processes, one conversation, through Redis.

Used only with `--redis URL` (docs/scaling-out.md explains the design and what each fault
does). Each process appends what its clients say to a Redis Stream and delivers what it
reads back, its own messages included, so every client of every process sees one order.
Stream entry ids are the message ids, and the stream keeps the history: a process that
loses Redis for a while resumes after the last entry it delivered, and one that starts
loads the history. Nothing here promises more than it knows: a hole in what a process
read is never offered as a complete catch-up, and a message whose write timed out is
neither reported as lost nor delivered twice.
"""

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import random
import secrets
import socket
import sys
import time
from urllib.parse import urlsplit

if sys.version_info < (3, 11):  # one sentence, as for every other mistake
    sys.exit("--redis needs Python 3.11 or newer (python3 --version tells which you have)")

try:
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as Unreachable
    from redis.exceptions import RedisError, ResponseError
    from redis.exceptions import TimeoutError as NoAnswer
except ModuleNotFoundError:  # one sentence, as for every other mistake
    sys.exit("--redis needs the redis package: pip install redis")

PREFIX = "broadcast"  # the keys' prefix (--redis-prefix): two deployments may share a Redis
# The keys, after the prefix: a stream of what clients said (the history), a stream of
# arrivals, departures and heartbeats, client numbers unique across processes, when that
# counter was (re)made, by Redis's clock, and (resume:HASH) the number each secret gives.
KEYS = ("messages", "presence", "client-numbers", "client-numbers-born", "resume")
MAX_ENTRY = 16 * 1024  # characters in a stream entry: a larger one is skipped, not relayed
MAX_TEXT = 1000  # characters in a message's text, as in 3_websocket_broadcast.py
KEEP = 1000  # entries each stream keeps at least, so a process that lags finds them
COUNT = 500  # entries one read takes at most: a process far behind catches up in steps
HEARTBEAT = 2  # seconds between "I'm alive, with these clients" entries
SILENT_LIMIT = 7  # seconds without a heartbeat before a process counts as gone
GRACE = 1.5  # seconds a new counter waits before numbering: running processes lift it first
TIMEOUT = 5  # seconds for any Redis command, and for start-up and stop
RESUMABLE = 24 * 3600, 600  # seconds a secret is valid: while connected, and after leaving
UNAVAILABLE = "broadcast unavailable: Redis is unreachable, try again soon"
REFUSED = "message not sent: Redis refused it ({}), try again later"

# Client numbers. After a Redis restart without persistence the counter starts again at
# 0: each process lifts it above every number it knows to be in use, when it reconnects and
# with each number it takes. A counter made again hands out no number for GRACE: processes
# that were running meanwhile reconnect and lift it first, so no number repeats.
# KEYS: the counter, when it was made (Redis's clock, ms); ARGV: GRACE in ms, the highest
# number this process knows, 1 to take a number (0: only lift). Returns it, or 0: not yet.
NUMBERS = """
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], now) end
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[2]) then
    redis.call('SET', KEYS[1], ARGV[2])
end
if ARGV[3] == '0' or now - tonumber(redis.call('GET', KEYS[2])) < tonumber(ARGV[1]) then
    return 0
end
return redis.call('INCR', KEYS[1])"""


async def start(url, history, deliver, clients, prefix=PREFIX):
    """Connect, check that Redis does all we need, load the history; or exit in one sentence.

    A password in the URL would show in `ps`: REDIS_PASSWORD is used if the URL has none."""
    conversation = Conversation(url, history, deliver, clients, prefix)
    try:
        async with asyncio.timeout(3 * TIMEOUT):
            await conversation.prepare()
    except (RedisError, OSError, ValueError) as exc:  # TimeoutError is an OSError
        why = str(exc).rstrip(".") or "it does not answer"
        sys.exit(f"Cannot use Redis at {masked(url)}: {why}. Check Redis, or run without --redis.")
    logging.info("sharing the conversation through Redis at %s (keys %s:*)", masked(url), prefix)
    return conversation


def masked(url):
    """The URL with its password, if any, as ***: fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def stream_id(text):
    """A stream entry id as numbers that sort as Redis sorts them, or None if it is not one."""
    try:
        ms, _, seq = str(text).partition("-")
        return int(ms), int(seq or 0)
    except ValueError:
        return None


class Writer:
    """Writing, one of Conversation's three jobs: one pipeline at a time carries every
    command waiting, in order; a message whose fate is unknown is sent again, once."""

    async def run(self, command, *args, message=False):
        """Run a Redis command in the next pipeline and return its result."""
        if not self.connected:  # don't queue up attempts while Redis is down
            raise Unreachable("Redis is unreachable")
        done = asyncio.get_running_loop().create_future()
        keep = max(KEEP, self.history.size) if message else None
        self.outbox.put_nowait((command, args, keep, done))
        return await done

    async def write(self):
        """Send everything run() queued, in one pipeline; stop at None, from close()."""
        while True:
            batch = [await self.outbox.get()]
            while not self.outbox.empty():
                batch.append(self.outbox.get_nowait())
            if None in batch:
                return
            if self.connected:  # writes that timed out go first, in their order
                batch, self.retry = [*self.retry, *batch], []
            pipe = self.redis.pipeline(transaction=False)
            for command, args, keep, _ in batch:
                getattr(pipe, command)(*args, **({"maxlen": keep} if keep else {}))
            try:
                results = await pipe.execute(raise_on_error=False) if self.connected else []
            except RedisError as exc:
                results = [exc] * len(batch)
            results += [Unreachable("Redis is unreachable")] * (len(batch) - len(results))
            for item, result in zip(batch, results, strict=True):
                self.settle(item, result)

    def settle(self, item, result):
        """Hand a command's result to whoever waits; keep a message whose fate is unknown."""
        command, args, _, done = item
        uncertain = isinstance(result, Unreachable | NoAnswer)
        if uncertain and command == "xadd" and args[0] == self.MESSAGES:
            # It may have reached Redis, or not: say nothing yet, send it again when Redis
            # is back, and let relay() deliver its uid once, whichever copy it reads.
            self.retry.append(item)
            result = None
        elif command == "xadd":  # every write says whether Redis takes writes (heartbeats too)
            self.writable(result)
        if done is None or done.done():  # presence, or its sender went away meanwhile
            return
        if isinstance(result, Exception):
            done.set_exception(result)
        else:
            done.set_result(result)

    def writable(self, result):
        """Note whether Redis accepts writes: out of memory or disk, it answers but refuses."""
        refused = isinstance(result, ResponseError)
        if refused and not self.refusing:
            logging.warning("Redis refuses writes (%s): refusing new clients (503)", result)
        elif self.refusing and not refused:
            logging.info("Redis accepts writes again")
        self.refusing = str(result) if refused else None


class Reader:
    """Reading, one of Conversation's three jobs: at start, the history and who is here; then
    every entry of both streams, in order, for as long as the process runs; whatever is
    wrong with an entry is skipped."""

    async def recent_presence(self):
        """Who is on the other processes, from the last SILENT_LIMIT seconds of presence,
        read before the first client: a process that (re)starts announces nobody as new.
        (One that died within them is forgotten SILENT_LIMIT seconds from now.)"""
        seconds, microseconds = await self.redis.time()
        start = seconds * 1000 + microseconds // 1000 - SILENT_LIMIT * 1000
        recent = await self.redis.xrange(self.PRESENCE, f"{start}-0", count=KEEP)
        newest = recent[-1:] or await self.redis.xrevrange(self.PRESENCE, count=1)
        self.last[self.PRESENCE] = newest[0][0] if newest else "0-0"  # relay() goes on there
        for entry_id, fields in recent:
            self.receive(self.PRESENCE, entry_id, fields)

    async def load_history(self):
        """The latest messages of the stream, read newest first in pages of COUNT."""
        self.history.known = self.history.latest = "0-0"  # the stream's ids, from its start
        try:
            info = await self.redis.xinfo_stream(self.MESSAGES)
        except ResponseError as exc:
            if "no such key" not in str(exc):
                raise
            return  # no such stream yet: nothing was ever said
        entries, upto, wanted = [], "+", self.history.size + 1
        while len(entries) < wanted:
            count = min(COUNT, wanted - len(entries))
            page = await self.redis.xrevrange(self.MESSAGES, upto, "-", count=count)
            entries += page
            if len(page) < count:
                break
            upto = f"({page[-1][0]}"  # "(": before the oldest of this page
        self.last[self.MESSAGES] = entries[0][0] if entries else info["last-generated-id"]
        if len(entries) == wanted or info["entries-added"] > info["length"]:  # some are gone:
            self.history.known = entries.pop()[0] if entries else self.last[self.MESSAGES]
        self.history.latest = self.history.known  # until a message is added
        for entry_id, fields in reversed(entries):
            with contextlib.suppress(Exception):  # a bad entry: relay() logs those it reads
                if (event := self.message(entry_id, fields)) and event["type"] == "message":
                    self.history.add(event)

    # The interface the handler uses.

    async def relay(self):
        """Deliver each new entry; if Redis goes away, retry every second or so, then resume."""
        while not self.stopping.is_set():
            try:
                if not self.connected:
                    await self.redis.ping()
                    await self.lift_counter()
                    self.connected = True
                    self.outbox.put_nowait(("ping", (), None, None))  # write() sends the retries
                    logging.info("Redis is back: relaying the conversation again")
                pipe = self.redis.pipeline(transaction=False)
                pipe.xrange(self.MESSAGES, self.last[self.MESSAGES], self.last[self.MESSAGES])
                pipe.xrange(self.MESSAGES, count=1)
                pipe.xread(self.last, count=COUNT, block=500)
                here, first, streams = await pipe.execute()
                if self.last[self.MESSAGES] != "0-0" and not here:
                    streams = self.lost_position(first[0][0] if first else None, streams)
                    await self.lift_counter()  # Redis may have restarted empty: so did it
                for stream, entries in streams or []:
                    for entry_id, fields in entries:
                        self.last[stream] = entry_id  # resume after it, whatever happens
                        self.receive(stream, entry_id, fields)
                async with self.read:
                    self.read.notify_all()
            except (RedisError, OSError) as exc:
                if self.connected:
                    logging.warning("lost Redis (%s); retrying", str(exc).rstrip("."))
                self.connected = False
                with contextlib.suppress(RedisError, OSError):  # no stale connections after
                    await self.redis.connection_pool.disconnect()
                with contextlib.suppress(TimeoutError):  # jitter: processes do not retry at once
                    await asyncio.wait_for(self.stopping.wait(), random.uniform(0.25, 0.75))

    def lost_position(self, first, streams):
        """The entry last read is gone: trimmed while this process lagged, or Redis came back
        empty (restarted without persistence, or a replica that had not got it)."""
        position = self.last[self.MESSAGES]
        logging.warning(
            "messages after %s may be lost here (the stream was trimmed or restarted): "
            "clients that come back from before will get the latest and recovered: false",
            position,
        )
        self.history.messages.clear()  # nobody can catch up across the hole
        self.history.bytes = 0
        self.history.known = self.history.latest = f"lost-{secrets.token_hex(4)}"
        if first is None or stream_id(first) < stream_id(position):
            # Empty, or new ids below the old position (a clock behind): read from the
            # start, or they would be skipped. What was read above is read again.
            self.last = {self.MESSAGES: "0-0", self.PRESENCE: "0-0"}
            return []
        return streams

    def receive(self, stream, entry_id, fields):
        """Deliver one entry; anything wrong with it is logged with its id and skipped."""
        try:
            if stream == self.PRESENCE:
                event = self.parse_presence(fields)
            else:
                event = self.message(entry_id, fields)
            if event:
                self.dispatch(event)
        except Exception as exc:  # one bad entry must not stop the reader
            logging.warning("skipped entry %s of %s (%r): %.200r", entry_id, stream, exc, fields)

    def message(self, entry_id, fields):
        """The event in an entry of the messages stream, or None if its uid was delivered
        already (a write sent again after a timeout, or read again after the stream came
        back). Its fields pass unchanged, but for those a reader relies on, checked here:
        an older process keeps what a newer one adds, during a rolling deploy."""
        event = self.parse(fields)
        if event["type"] == "message":
            client, text, said = event.get("client"), event.get("text"), event.get("time")
            if not (isinstance(client, int) and isinstance(text, str) and isinstance(said, int)):
                raise TypeError("client and time must be numbers, text a string")
            if len(text) > MAX_TEXT:
                raise ValueError(f"text over {MAX_TEXT} characters")
            text.encode()  # a lone surrogate could not be sent: refuse it here
        uid = str(event.pop("uid", entry_id))
        if uid in self.seen:
            return None
        self.seen[uid] = entry_id
        while len(self.seen) > 10 * KEEP:
            self.seen.popitem(last=False)
        return {**event, "id": entry_id}  # stream ids are message ids

    def parse(self, fields):
        """The event in an entry: a JSON object with a type, of a bounded size."""
        if len(fields["event"]) > MAX_ENTRY:
            raise ValueError(f"over {MAX_ENTRY} characters")
        event = json.loads(fields["event"])
        if not (isinstance(event, dict) and isinstance(event.get("type"), str)):
            raise TypeError("not an object with a type")
        event.pop("server", None)  # which process wrote it: not for clients
        return event

    def parse_presence(self, fields):
        """An entry of the presence stream, checked: a heartbeat, or who joined or left where."""
        server, event = str(json.loads(fields["event"]).get("server")), self.parse(fields)
        if event["type"] == "heartbeat":
            clients = set(event["clients"])
            if not all(isinstance(n, int) for n in clients):
                raise TypeError("clients must be numbers")
            return {"type": "heartbeat", "server": server, "clients": clients}
        if event["type"] in ("joined", "left") and isinstance(event.get("client"), int):
            return {"type": event["type"], "server": server, "client": event["client"]}
        raise ValueError(f"unknown type {event['type']!r}")

    def dispatch(self, event):
        """Deliver an event here, and keep count of the other processes' clients."""
        server = event.pop("server", None)
        if event["type"] == "heartbeat":
            if server != self.server:
                self.heard(server, event["clients"])
        elif server is None or server == self.server:  # a message, or a presence from here
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

    def reader_ended(self, task):
        """The reader must run for as long as the process does: if it ends, say so loudly."""
        if self.stopping.is_set():
            return
        why = "cancelled" if task.cancelled() else repr(task.exception())
        logging.error("the Redis reader stopped (%s): refusing new clients (503)", why)
        for websocket in list(self.clients):  # they would hear nothing more: send them on
            websocket.closing = asyncio.ensure_future(websocket.close(1013, "try another server"))


class Conversation(Reader, Writer):
    """The same interface as the local Conversation in 3_websocket_broadcast.py; it writes
    (Writer, above), reads (Reader, above) and beats (below)."""

    def __init__(self, url, history, deliver, clients, prefix=PREFIX):
        # No retries inside redis-py: a retried XADD could add a message twice; this
        # module retries a message itself, with the same uid, and delivers it once.
        self.redis = redis.from_url(
            url,
            socket_timeout=TIMEOUT,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
            password=os.environ.get("REDIS_PASSWORD"),  # the URL's, if it has one
        )
        keys = (f"{prefix}:{k}" for k in KEYS)
        self.MESSAGES, self.PRESENCE, self.COUNTER, self.BORN, self.RESUME = keys
        self.history, self.deliver, self.clients = history, deliver, clients
        # Unique even if two containers share a host name and a process id.
        self.server = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.others = {}  # another process -> (its client numbers, when last heard)
        self.last = {self.MESSAGES: "0-0", self.PRESENCE: "$"}  # the last entry read from each
        self.seen = collections.OrderedDict()  # uids of the latest messages delivered -> id
        self.outbox = asyncio.Queue()  # commands for the next pipeline
        self.retry = []  # message writes that timed out: sent again, same uid, once back
        self.read = asyncio.Condition()  # notified after each read: new_client() waits on it
        self.stopping = asyncio.Event()  # set by close()
        self.connected = False  # True while Redis answers
        self.refusing = None  # what Redis said while it refuses writes (out of memory, disk)
        self.tasks = []

    @property
    def available(self):
        """Whether this process can serve a client: Redis answers, takes writes, and the
        reader runs."""
        reading = bool(self.tasks) and not self.tasks[0].done()
        return self.connected and not self.refusing and reading

    async def prepare(self):
        """Run every command once, load the history, then read, write and beat."""
        await self.redis.ping()
        await self.lift_counter()
        await self.load_history()
        await self.recent_presence()
        await self.redis.xadd(self.PRESENCE, self.entry(self.heartbeat_event()), maxlen=KEEP)
        await self.redis.xread(self.last, count=1)
        await self.redis.getdel(self.secret_key("check"))  # Redis 6.2 or newer
        self.connected = True
        for work in (self.relay, self.write, self.beat):
            self.tasks.append(asyncio.create_task(work()))
        self.tasks[0].add_done_callback(self.reader_ended)

    async def new_client(self, websocket, since, secret):
        """The number a secret was given for (once, by any process), else one unique across
        processes; a new secret; and once this process has read up to `since`.

        A client whose process died may reach this one before it read the last message
        the client saw: that `since` is not unknown, only not read yet. Wait for it."""
        try:
            number = int(await self.run("getdel", self.secret_key(secret)) or 0) if secret else 0
            async with asyncio.timeout(TIMEOUT):
                while not number:  # 0: within the grace after a Redis restart
                    number = await self.run("eval", *self.counter(take=True))
                    if not number:
                        await asyncio.sleep(0.1)
            if target := stream_id(since):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TIMEOUT), self.read:
                        last = self.MESSAGES
                        await self.read.wait_for(lambda: stream_id(self.last[last]) >= target)
            websocket.resume = None
            if websocket.subprotocol:  # a client that can give it back: a page
                websocket.resume = secrets.token_urlsafe(16)  # 128 random bits
                await self.run("set", self.secret_key(websocket.resume), number, RESUMABLE[0])
        except (RedisError, TimeoutError) as exc:
            logging.warning("refused a client: no client number from Redis (%s)", exc)
            await websocket.close(1013, "broadcast unavailable, try again later")
            # End the handler as a cancelled task ends: quietly, nothing to clean up.
            raise asyncio.CancelledError from None
        return number, websocket.resume

    def secret_key(self, secret):
        """Where a secret's number is kept: under a hash, never the secret (Redis logs slow
        commands with their arguments)."""
        return f"{self.RESUME}:{hashlib.sha256(str(secret).encode()).hexdigest()}"

    async def publish(self, event):
        """Append an event to its stream; return None, or a reply for its sender."""
        if event["type"] in ("joined", "left"):  # presence: best effort, heartbeats correct it
            self.later("xadd", self.PRESENCE, self.entry(event))
            return None
        # A message the page sent again (same number, same ref) is delivered once: by
        # relay(), in every process, whichever copy it reads first.
        uid = f"{event['client']}:{event['ref']}" if event.get("ref") else secrets.token_hex(8)
        if uid in self.seen:  # delivered already: its acknowledgement was lost on the way
            return {"type": "sent", "id": self.seen[uid]}
        event = {**event, "time": time.time_ns() // 1_000_000, "uid": uid}
        try:
            await self.run("xadd", self.MESSAGES, self.entry(event), message=True)
        except ResponseError as exc:  # Redis answered, and refused it: say what it said
            logging.warning("Redis refused a message (%s)", exc)
            return {"type": "error", "reason": REFUSED.format(str(exc).rstrip("."))}
        except RedisError as exc:  # Redis was known to be away: not written
            logging.warning("cannot write to Redis (%s)", exc)
            return {"type": "error", "reason": UNAVAILABLE}
        return None

    async def leave(self, websocket, client):
        """Say it left (clients hear it after a grace); its secret is valid a while longer."""
        if websocket.resume:
            self.later("expire", self.secret_key(websocket.resume), RESUMABLE[1])
        await self.publish({"type": "left", "client": client})

    def later(self, command, *args):
        """Queue a command for the next pipeline without waiting for it: best effort."""
        if self.connected:
            keep = KEEP if command == "xadd" else None
            self.outbox.put_nowait((command, args, keep, None))

    def numbers(self):
        """The client numbers connected here and on every other live process."""
        return set(self.clients.values()).union(*(c for c, _ in self.others.values()))

    async def close(self):
        """Stop reading, writing and beating within about a second, whatever Redis does."""
        self.stopping.set()  # relay() stops after its read
        self.outbox.put_nowait(None)  # write() stops after what it is sending
        self.tasks[2].cancel()  # beat() waits on a timer
        # redis-py can hang when cancelled in the middle of a command: cancel only
        # what did not stop by itself, and do not wait on it for long.
        _, late = await asyncio.wait(self.tasks, timeout=1)
        for task in late:
            task.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await self.redis.aclose()

    # Heartbeats: who is connected here; forget the processes that went silent.

    async def beat(self):
        while True:
            await asyncio.sleep(HEARTBEAT)
            self.later("xadd", self.PRESENCE, self.entry(self.heartbeat_event()))
            now = asyncio.get_running_loop().time()
            for server, (clients, heard) in list(self.others.items()):
                if self.refusing:  # nobody's heartbeat can be written: silence says nothing
                    self.others[server] = (clients, now)
                elif now - heard > SILENT_LIMIT:  # killed, or cut off from Redis
                    del self.others[server]
                    if clients:
                        logging.warning("%s went silent; its %d clients left", server, len(clients))
                    for client in sorted(clients):
                        self.deliver({"type": "left", "client": client})

    def heartbeat_event(self):
        return {"type": "heartbeat", "clients": sorted(self.clients.values())}

    def entry(self, event):
        return {"event": json.dumps({**event, "server": self.server}, ensure_ascii=False)}

    async def lift_counter(self):
        await self.redis.eval(*self.counter(take=False))

    def counter(self, take):
        """The arguments of NUMBERS: take a number, or only lift the counter."""
        known = [*self.clients.values(), *(n for c, _ in self.others.values() for n in c)]
        return NUMBERS, 2, self.COUNTER, self.BORN, GRACE * 1000, max(known, default=0), int(take)
