"""RedisStateStore: scheduler state shared by several scheduler processes (`type = "redis"`).

Keys (all under `key_prefix`):
    op:<name>          hash {v: version, d: msgpack record}
    live               hash encoded action key -> name of the live operation (dedup index)
    meta               hash {live: unfinished operations, count: records, seq: FIFO counter}
    queues             set of encoded queue keys that may hold entries
    queue:<queue key>  sorted set, all scores 0, members "<priority>:<seq>:<name>" (ordered
                       lexicographically: priority then FIFO, exact for any int32 priority)
    unwatched          sorted set name -> since (no client waits)
    completed          sorted set name -> completed_at (retention)
    executing          hash name -> worker id
    checking           sorted set name -> created_at (in CACHE_CHECK)
    workers            hash worker id -> msgpack lease; worker_owner: worker id -> scheduler id
    changes            pub/sub channel: msgpack (name, version, stage, worker, attempt, origin)

Every write of a record is one Lua script that checks the version and updates the indexes in
the same atomic step, so a record and its indexes never disagree, and two schedulers can never
both move one operation from the same version (that is how an attempt is claimed exactly once).
Scripts are not retried on a lost reply (a retry of an applied write would look like a
conflict and be re-applied on top of itself); the caller re-reads and decides again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

import anyio
import coredis
import msgspec
import trio
from coredis.exceptions import RedisError
from coredis.tokens import PureToken

from reexec.metrics import STATE_STORE_ERRORS as STATE_ERRORS
from reexec.metrics import STATE_STORE_LATENCY as STATE_LATENCY
from reexec.redis_client import connect, is_unavailable, parse_url
from reexec.sched.matching import QueueKey
from reexec.sched.state import Operation, Stage
from reexec.sched.state_store import (
    ActionKeyTuple,
    Change,
    QueueHead,
    StateUnavailable,
    WorkerLease,
    decode_operation,
    encode_operation,
    index_change,
)

log = logging.getLogger(__name__)

# Waiters re-read at least this often even without a change message (messages published
# while the listener reconnects are lost).
POLL_S = 5.0

_WRITE = """
local op = KEYS[1]
local cur = redis.call('HGET', op, 'v')
if cur == ARGV[3] and redis.call('HGET', op, 'w') == ARGV[22] then
  return 1  -- this very write, retried after its reply was lost
end
if ARGV[1] == 'create' then
  if cur then return 0 end
  redis.call('HINCRBY', KEYS[3], 'count', 1)
else
  if (not cur) or cur ~= ARGV[2] then return 0 end
end
redis.call('HSET', op, 'v', ARGV[3], 'd', ARGV[4], 'w', ARGV[22])
local name = ARGV[5]
if ARGV[7] == '1' then redis.call('HSETNX', KEYS[2], ARGV[6], name) end
if ARGV[8] == '1' and redis.call('HGET', KEYS[2], ARGV[6]) == name then
  redis.call('HDEL', KEYS[2], ARGV[6])
end
if ARGV[9] ~= '0' then redis.call('HINCRBY', KEYS[3], 'live', ARGV[9]) end
if ARGV[10] ~= '' then redis.call('ZREM', KEYS[8], ARGV[10]) end
if ARGV[11] ~= '' then
  redis.call('ZADD', KEYS[9], 0, ARGV[11])
  redis.call('SADD', KEYS[7], ARGV[12])
end
if ARGV[14] == '1' then redis.call('ZREM', KEYS[4], name) end
if ARGV[13] ~= '' then redis.call('ZADD', KEYS[4], ARGV[13], name) end
if ARGV[15] ~= '' then redis.call('ZADD', KEYS[6], ARGV[15], name) end
if ARGV[17] == '1' then redis.call('HDEL', KEYS[5], name) end
if ARGV[16] ~= '' then redis.call('HSET', KEYS[5], name, ARGV[16]) end
if ARGV[24] == '1' then redis.call('ZREM', KEYS[10], name) end
if ARGV[23] ~= '' then redis.call('ZADD', KEYS[10], ARGV[23], name) end
if ARGV[20] ~= ARGV[21] then
  if ARGV[20] ~= '' then redis.call('HINCRBY', KEYS[3], 'stage:' .. ARGV[20], -1) end
  redis.call('HINCRBY', KEYS[3], 'stage:' .. ARGV[21], 1)
end
redis.call('PUBLISH', ARGV[19], ARGV[18])
return 1
"""

_DELETE = """
local op = KEYS[1]
local cur = redis.call('HGET', op, 'v')
if (not cur) or cur ~= ARGV[1] then return 0 end
redis.call('DEL', op)
redis.call('HINCRBY', KEYS[3], 'count', -1)
local name = ARGV[2]
if redis.call('HGET', KEYS[2], ARGV[3]) == name then redis.call('HDEL', KEYS[2], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[7], ARGV[4]) end
if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[3], 'live', -1) end
redis.call('ZREM', KEYS[4], name)
redis.call('ZREM', KEYS[6], name)
redis.call('HDEL', KEYS[5], name)
redis.call('ZREM', KEYS[8], name)
redis.call('HINCRBY', KEYS[3], 'stage:' .. ARGV[8], -1)
redis.call('PUBLISH', ARGV[7], ARGV[6])
return 1
"""

_HEADS = """
local out = {}
for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('ZRANGE', ARGV[1] .. k, 0, 0)
  if #h == 0 then
    redis.call('SREM', KEYS[1], k)
  else
    table.insert(out, k)
    table.insert(out, h[1])
  end
end
return out
"""

_DEPTHS = """
local out = {}
for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  table.insert(out, k)
  table.insert(out, redis.call('ZCARD', ARGV[1] .. k))
end
return out
"""

_DROP_LEASE = """
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

_PRIORITY_BIAS = 1 << 31


def queue_member(priority: int, seq: int, name: str) -> str:
    p = min(max(priority + _PRIORITY_BIAS, 0), (1 << 32) - 1)
    return f"{p:010d}:{seq:016d}:{name}"


def parse_member(member: str) -> tuple[int, int, str]:
    p, seq, name = member.split(":", 2)
    return int(p) - _PRIORITY_BIAS, int(seq), name


def encode_queue_key(key: QueueKey) -> str:
    return msgspec.json.encode(key).decode()


def decode_queue_key(text: str) -> QueueKey:
    return tuple(tuple(pair) for pair in msgspec.json.decode(text))  # type: ignore[misc]


def encode_action_key(key: ActionKeyTuple) -> str:
    return msgspec.json.encode(key).decode()


_lease_encoder = msgspec.msgpack.Encoder()
_lease_decoder = msgspec.msgpack.Decoder(WorkerLease)
_change_decoder = msgspec.msgpack.Decoder(tuple[str, int, int, str, int, str])


class RedisStateStore:
    shared = True

    def __init__(
        self, url: str, *, key_prefix: str, scheduler_id: str, timeout_s: float = 5.0
    ) -> None:
        self.url = url
        self.prefix = key_prefix
        self.scheduler_id = scheduler_id
        self.timeout_s = timeout_s
        self._client: coredis.Redis[bytes] = connect(url, timeout_s=timeout_s)
        self._where = parse_url(url).where
        p = key_prefix
        self._k_live = p + "live"
        self._k_meta = p + "meta"
        self._k_queues = p + "queues"
        self._k_unwatched = p + "unwatched"
        self._k_completed = p + "completed"
        self._k_executing = p + "executing"
        self._k_checking = p + "checking"
        self._k_workers = p + "workers"
        self._k_owner = p + "worker_owner"
        self._channel = p + "changes"
        self._write = self._client.register_script(_WRITE)
        self._delete = self._client.register_script(_DELETE)
        self._heads = self._client.register_script(_HEADS)
        self._depths = self._client.register_script(_DEPTHS)
        self._drop_lease = self._client.register_script(_DROP_LEASE)
        self._callbacks: list[Callable[[Change], None]] = []
        # name -> [event, number of waiters]; set (and dropped) when a change message arrives.
        self._watchers: dict[str, list] = {}
        self._barriers: dict[str, trio.Event] = {}
        self.available = True

    def _op_key(self, name: str) -> str:
        return f"{self.prefix}op:{name}"

    def _queue_key(self, encoded: str) -> str:
        return f"{self.prefix}queue:{encoded}"

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            with trio.fail_after(self.timeout_s):
                yield
        except trio.TooSlowError:
            STATE_ERRORS.inc()
            self._down(f"no answer within {self.timeout_s:g}s")
        except Exception as e:
            if not is_unavailable(e):
                raise  # a script bug or a wrong key type: not the store being away
            STATE_ERRORS.inc()
            self._down(str(e) or type(e).__name__)
        else:
            self.available = True
            STATE_LATENCY.observe(time.perf_counter() - started, what)

    def _down(self, why: str) -> None:
        if self.available:
            log.warning("scheduler state store %s unavailable: %s", self._where, why)
        self.available = False
        raise StateUnavailable(
            f"the scheduler's state store (redis at {self._where}) is unavailable: {why}; "
            "retry shortly"
        )

    # -- lifetime ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Closing the client while it is cancelled can raise for connections already gone.
        with _tolerate_lost_connections():
            async with self._client:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._listen)
                    task_status.started()

    def on_change(self, callback: Callable[[Change], None]) -> None:
        self._callbacks.append(callback)

    async def _listen(self) -> None:
        """Deliver change messages; after any gap, wake every waiter so it re-reads."""
        delay = 0.1
        while True:
            with _tolerate_lost_connections():
                async with self._client.pubsub(channels=[self._channel]) as ps:
                    async for message in ps:
                        if message["type"] == "subscribe":
                            delay = 0.1
                            self._wake_all()
                            continue
                        if message["type"] == "message":
                            self._deliver(message["data"])
            self._wake_all()
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def sync(self) -> None:
        """Return once every change published before the call has reached our listener
        (Redis delivers one channel's messages in publish order)."""
        token = uuid.uuid4().hex
        arrived = self._barriers[token] = trio.Event()
        try:
            # Published again until it arrives: the listener may not have subscribed yet.
            while not arrived.is_set():
                with self._call("publish"):
                    await self._client.publish(self._channel, ("sync:" + token).encode())
                with trio.move_on_after(0.2):
                    await arrived.wait()
        finally:
            self._barriers.pop(token, None)

    def _deliver(self, data: str | bytes) -> None:
        raw = data.encode("latin-1") if isinstance(data, str) else data
        if raw.startswith(b"sync:"):
            barrier = self._barriers.get(raw[5:].decode(errors="replace"))
            if barrier is not None:
                barrier.set()
            return
        try:
            name, version, stage, worker, attempt, origin = _change_decoder.decode(raw)
        except msgspec.DecodeError:
            return
        watcher = self._watchers.pop(name, None)
        if watcher is not None:
            watcher[0].set()
        if origin == self.scheduler_id:
            return
        change = Change(name, version, Stage(stage), worker, attempt, origin)
        for callback in self._callbacks:
            callback(change)

    def _wake_all(self) -> None:
        watchers, self._watchers = self._watchers, {}
        for event, _ in watchers.values():
            event.set()
        for callback in self._callbacks:
            callback(Change("", 0, Stage.QUEUED, "", 0, ""))  # "anything may have changed"

    def _payload(self, op: Operation) -> bytes:
        return _lease_encoder.encode(
            (op.name, op.version, int(op.stage), op.worker_id, op.attempt, self.scheduler_id)
        )

    # -- records ----------------------------------------------------------------------------

    async def get(self, name: str) -> Operation | None:
        with self._call("get"):
            data = await self._client.hget(self._op_key(name), "d")
        return None if data is None else decode_operation(_bytes(data))

    async def create(self, op: Operation, *, mergeable: bool) -> bool:
        return await self._write_op(None, op, mergeable=mergeable)

    async def compare_and_set(self, expected: Operation, new: Operation) -> bool:
        return await self._write_op(expected, new, mergeable=False)

    async def _write_op(self, old: Operation | None, new: Operation, *, mergeable: bool) -> bool:
        ix = index_change(old, new)
        qrem_key = qrem_member = qadd_key = qadd_member = qadd_enc = ""
        if ix.queue_remove is not None and old is not None:
            key, priority, seq = ix.queue_remove
            qrem_key = self._queue_key(encode_queue_key(key))
            qrem_member = queue_member(priority, seq, new.name)
        if ix.queue_add is not None:
            key, priority, seq = ix.queue_add
            qadd_enc = encode_queue_key(key)
            qadd_key = self._queue_key(qadd_enc)
            qadd_member = queue_member(priority, seq, new.name)
        keys = [
            self._op_key(new.name),
            self._k_live,
            self._k_meta,
            self._k_unwatched,
            self._k_executing,
            self._k_completed,
            self._k_queues,
            qrem_key or self._k_queues + ":none",
            qadd_key or self._k_queues + ":none",
            self._k_checking,
        ]
        args = [
            "create" if old is None else "cas",
            str(old.version) if old is not None else "",
            str(new.version),
            encode_operation(new),
            new.name,
            encode_action_key(new.action_key),
            "1" if mergeable else "0",
            "1" if ix.release_live else "0",
            str(ix.live_delta),
            qrem_member,
            qadd_member,
            qadd_enc,
            "" if ix.unwatched_since is None else repr(ix.unwatched_since),
            "1" if ix.unwatched_clear else "0",
            "" if ix.completed_at is None else repr(ix.completed_at),
            ix.executing_worker or "",
            "1" if ix.executing_clear else "0",
            self._payload(new),
            self._channel,
            old.stage.name if old is not None else "",
            new.stage.name,
            # Identifies this write: two writers can produce byte-identical records (the same
            # event at the same clock reading), and only our own retry may count as done.
            uuid.uuid4().hex,
            "" if ix.checking_since is None else repr(ix.checking_since),
            "1" if ix.checking_clear else "0",
        ]
        with self._call("write"):
            done = await self._write(keys=keys, args=args)
        return bool(done)

    async def delete(self, op: Operation) -> bool:
        qkey = member = ""
        if op.stage is Stage.QUEUED:
            qkey = self._queue_key(encode_queue_key(op.queue_key))
            member = queue_member(op.priority, op.queue_seq, op.name)
        keys = [
            self._op_key(op.name),
            self._k_live,
            self._k_meta,
            self._k_unwatched,
            self._k_executing,
            self._k_completed,
            qkey or self._k_queues + ":none",
            self._k_checking,
        ]
        args = [
            str(op.version),
            op.name,
            encode_action_key(op.action_key),
            member,
            "0" if op.done else "1",
            self._payload(op),
            self._channel,
            op.stage.name,
        ]
        with self._call("delete"):
            done = await self._delete(keys=keys, args=args)
        return bool(done)

    async def wait_changed(self, op: Operation) -> Operation | None:
        while True:
            watcher = self._watchers.get(op.name)
            if watcher is None:
                watcher = self._watchers[op.name] = [trio.Event(), 0]
            watcher[1] += 1
            try:
                current = await self.get(op.name)
                if current is None or current.version != op.version:
                    return current
                with trio.move_on_after(POLL_S):
                    await watcher[0].wait()
            finally:
                watcher[1] -= 1
                if watcher[1] == 0 and self._watchers.get(op.name) is watcher:
                    del self._watchers[op.name]

    async def live_for(self, key: ActionKeyTuple) -> Operation | None:
        with self._call("live_for"):
            name = await self._client.hget(self._k_live, encode_action_key(key))
        return None if name is None else await self.get(_text(name))

    async def live_count(self) -> int:
        with self._call("meta"):
            value = await self._client.hget(self._k_meta, "live")
        return int(value or 0)

    async def count(self) -> int:
        with self._call("meta"):
            value = await self._client.hget(self._k_meta, "count")
        return int(value or 0)

    async def stage_counts(self) -> dict[str, int]:
        with self._call("meta"):
            meta = await self._client.hgetall(self._k_meta)
        out = {}
        for k, v in meta.items():
            key = _text(k)
            if key.startswith("stage:") and int(v) > 0:
                out[key[6:]] = int(v)
        return out

    async def next_seq(self) -> int:
        with self._call("seq"):
            return int(await self._client.hincrby(self._k_meta, "seq", 1))

    async def operations(self) -> AsyncIterator[Operation]:
        cursor = 0
        while True:
            with self._call("scan"):
                cursor, keys = await self._client.scan(cursor, match=self._op_key("*"), count=1000)
            for key in keys:
                with self._call("get"):
                    data = await self._client.hget(key, "d")
                if data is not None:
                    yield decode_operation(_bytes(data))
            if int(cursor) == 0:
                return

    # -- indexes ----------------------------------------------------------------------------

    async def queue_heads(self) -> list[QueueHead]:
        with self._call("heads"):
            flat = await self._heads(keys=[self._k_queues], args=[self.prefix + "queue:"])
        heads = []
        for i in range(0, len(flat), 2):
            enc, member = _text(flat[i]), _text(flat[i + 1])
            priority, seq, name = parse_member(member)
            heads.append(QueueHead(decode_queue_key(enc), priority, seq, name, (enc, member)))
        return heads

    async def queue_discard(self, head: QueueHead) -> None:
        """Drop a queue entry whose record is no longer queued with that sequence number."""
        op = await self.get(head.name)
        if op is not None and op.stage is Stage.QUEUED and op.queue_seq == head.seq:
            return
        enc, member = head.token  # type: ignore[misc]
        with self._call("zrem"):
            await self._client.zrem(self._queue_key(enc), [member])

    async def queue_depths(self) -> dict[QueueKey, int]:
        with self._call("depths"):
            flat = await self._depths(keys=[self._k_queues], args=[self.prefix + "queue:"])
        out = {}
        for i in range(0, len(flat), 2):
            n = int(flat[i + 1])
            if n:
                out[decode_queue_key(_text(flat[i]))] = n
        return out

    async def unwatched_before(self, t: float) -> list[str]:
        with self._call("zrange"):
            names = await self._client.zrange(
                self._k_unwatched, "-inf", _below(t), sortby=PureToken.BYSCORE, offset=0, count=1000
            )
        return [_text(n) for n in names]

    async def completed_before(self, t: float) -> list[str]:
        with self._call("zrange"):
            names = await self._client.zrange(
                self._k_completed, "-inf", _below(t), sortby=PureToken.BYSCORE, offset=0, count=1000
            )
        return [_text(n) for n in names]

    async def checking_before(self, t: float) -> list[str]:
        with self._call("zrange"):
            names = await self._client.zrange(
                self._k_checking, "-inf", _below(t), sortby=PureToken.BYSCORE, offset=0, count=1000
            )
        return [_text(n) for n in names]

    async def executing(self) -> dict[str, str]:
        with self._call("executing"):
            entries = await self._client.hgetall(self._k_executing)
        return {_text(k): _text(v) for k, v in entries.items()}

    # -- worker leases ----------------------------------------------------------------------

    async def put_leases(self, leases: list[WorkerLease]) -> None:
        if not leases:
            return
        with self._call("leases"):
            await self._client.hset(
                self._k_workers, {lease.worker_id: _lease_encoder.encode(lease) for lease in leases}
            )
            await self._client.hset(
                self._k_owner, {lease.worker_id: lease.scheduler_id for lease in leases}
            )

    async def drop_lease(self, worker_id: str) -> None:
        with self._call("leases"):
            await self._drop_lease(
                keys=[self._k_workers, self._k_owner], args=[worker_id, self.scheduler_id]
            )

    async def forget_lease(self, lease: WorkerLease) -> None:
        """Remove an expired lease (whoever held it)."""
        with self._call("leases"):
            await self._drop_lease(
                keys=[self._k_workers, self._k_owner], args=[lease.worker_id, lease.scheduler_id]
            )

    async def leases(self) -> dict[str, WorkerLease]:
        with self._call("leases"):
            entries = await self._client.hgetall(self._k_workers)
        out = {}
        for k, v in entries.items():
            try:
                out[_text(k)] = _lease_decoder.decode(_bytes(v))
            except msgspec.DecodeError:
                continue
        return out


_LOST_CONNECTION = (
    RedisError,
    OSError,
    TimeoutError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.BrokenResourceError,
)


@contextmanager
def _tolerate_lost_connections() -> Iterator[None]:
    """Swallow errors (alone or grouped) that only say a Redis connection is gone."""
    try:
        yield
    except BaseExceptionGroup as group:
        _, rest = group.split(_LOST_CONNECTION)
        if rest is not None:
            raise rest from None
        log.debug("state store connection lost: %s", group)
    except _LOST_CONNECTION as e:
        log.debug("state store connection lost: %s", e)


def _below(t: float) -> str:
    return "+inf" if t == float("inf") else f"({t!r}"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")
