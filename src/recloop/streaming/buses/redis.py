"""Redis Streams (``redis://host:port/db``, ``rediss://``, ``unix://``): one stream entry per
event with the JSON payload in field ``e``; consumer groups with XREADGROUP, pending lists
taken over with XAUTOCLAIM; publishing and acknowledging go through pipelines."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from recloop.errors import ConfigError
from recloop.streaming.buses.base import (
    DEFAULT_STREAM,
    ORIGINAL_FIELD_PREFIX,
    PAYLOAD_FIELD,
    DeadLetterRecord,
)
from recloop.streaming.events import BusMessage, DeadLetter

logger = logging.getLogger(__name__)


PUBLISH_SCRIPT = """
local ids = {}
for i = 2, #ARGV do
  ids[i - 1] = redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[i])
end
return ids
"""
"""XADD each payload ARGV[2..] to the stream KEYS[1] under the field ARGV[1], in order;
their entry ids."""


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _messages(entries: Any) -> list[BusMessage]:
    """Raw stream entries ``[[id, [field, value, ...]], ...]`` → messages.

    The bus reads with redis-py's reply callbacks switched off for XREADGROUP and XAUTOCLAIM:
    its generic conversion (a dict per entry) cost more than the rest of a batch's parsing.
    """
    out = []
    for entry in entries:
        if entry is None:
            continue
        entry_id, fields = entry
        if fields is None:  # deleted (trimmed) while pending
            continue
        if not isinstance(fields, dict) and len(fields) == 2 and fields[0] == PAYLOAD_FIELD:
            out.append(BusMessage(_s(entry_id), fields[1]))  # the usual entry
            continue
        # Other fields beside (or instead of) the payload: kept for a dead letter.
        named = (
            dict(fields)
            if isinstance(fields, dict)
            else dict(zip(fields[::2], fields[1::2], strict=False))
        )
        payload = named.pop(PAYLOAD_FIELD, None)
        out.append(BusMessage(_s(entry_id), payload, named or None))
    return out


def _stream_entries(reply: Any) -> Any:
    """Entries of the one stream in a raw XREADGROUP reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))
    return reply[0][1]


def _raw(response: Any, **_options: Any) -> Any:
    return response


class RedisStreamBus:
    """Redis Streams; see the module docstring.  Entries are never trimmed here."""

    def __init__(
        self,
        url: str,
        *,
        stream: str = DEFAULT_STREAM,
        dead_letter_stream: str | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        self.url = url
        self.stream = stream
        self.dead_letter_stream = dead_letter_stream or f"{stream}:dead"
        self._timeout_s = timeout_s
        self._claim_cursor: dict[str, str] = {}
        try:
            # One quick transparent retry covers a dropped idle connection; longer outages
            # are the caller's to back off from.
            self._client: Any = aioredis.from_url(
                url,
                socket_connect_timeout=timeout_s,
                socket_timeout=None,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
                decode_responses=False,
            )
        except ValueError as exc:
            raise ConfigError(f"bus url {url!r}: {exc}") from None
        for command in ("XREADGROUP", "XAUTOCLAIM"):
            self._client.set_response_callback(command, _raw)
        self._publish_script = self._client.register_script(PUBLISH_SCRIPT)

    async def publish(self, payloads: Sequence[bytes]) -> list[str]:
        if not payloads:
            return []
        # One EVALSHA whose script XADDs each payload (the same entries as one XADD each):
        # a pipeline of N XADDs cost redis-py about 3x the CPU per entry (a command object,
        # packing and a reply callback each), which a served-list log pays on every list.
        # The Script object loads the script again when the server has lost it.
        ids = await self._publish_script(keys=[self.stream], args=[PAYLOAD_FIELD, *payloads])
        return [_s(x) for x in ids]

    async def publish_counted(self, payloads: Sequence[bytes], *, counter: str) -> int:
        pipe = self._client.pipeline(transaction=True)
        for p in payloads:
            pipe.xadd(self.stream, {PAYLOAD_FIELD: p})
        pipe.incrby(counter, len(payloads))
        pipe.expire(counter, 7 * 24 * 3600)
        out = await pipe.execute()
        return int(out[-2])

    async def ensure_group(self, group: str) -> None:
        from redis.exceptions import ResponseError

        try:
            await self._client.xgroup_create(self.stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _with_group(self, group: str, fn: Any) -> Any:
        """Run ``fn``; if Redis lost the group (restart, reset), recreate it and run again."""
        from redis.exceptions import ResponseError

        try:
            return await fn()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            logger.warning("consumer group %s of %s is gone; recreating it", group, self.stream)
            self._claim_cursor.pop(group, None)
            await self.ensure_group(group)
            return await fn()

    async def read(
        self, group: str, consumer: str, *, count: int, block_ms: int
    ) -> list[BusMessage]:
        async def go() -> Any:
            return await self._client.xreadgroup(
                group, consumer, {self.stream: ">"}, count=count, block=block_ms or None
            )

        return _messages(_stream_entries(await self._with_group(group, go)))

    async def read_own_pending(self, group: str, consumer: str, *, count: int) -> list[BusMessage]:
        async def go() -> Any:
            return await self._client.xreadgroup(group, consumer, {self.stream: "0"}, count=count)

        return _messages(_stream_entries(await self._with_group(group, go)))

    async def claim_stale(
        self, group: str, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[BusMessage]:
        start = self._claim_cursor.get(group, "0-0")

        async def go() -> Any:
            return await self._client.xautoclaim(
                self.stream, group, consumer, min_idle_ms, start_id=start, count=count
            )

        reply = await self._with_group(group, go)
        nxt, entries = _s(reply[0]), reply[1]
        # "0-0" means the scan of the pending list wrapped around; start over next time.
        self._claim_cursor[group] = nxt
        return _messages(entries)

    async def touch(self, group: str, consumer: str, ids: Sequence[str]) -> None:
        if ids:
            await self._client.xclaim(self.stream, group, consumer, 0, list(ids), justid=True)

    async def ack(self, group: str, ids: Sequence[str]) -> int:
        from redis.exceptions import ResponseError

        if not ids:
            return 0
        try:
            return int(await self._client.xack(self.stream, group, *ids))
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The group (and the entries) vanished, e.g. Redis restarted without persistence:
            # there is nothing left to acknowledge.
            logger.warning("ack: consumer group %s of %s is gone", group, self.stream)
            await self.ensure_group(group)
            return 0

    async def dead_letter(self, letters: Sequence[DeadLetter], *, consumer: str) -> None:
        if not letters:
            return
        pipe = self._client.pipeline(transaction=False)
        for d in letters:
            entry = {
                b"payload": d.payload,
                b"reason": d.reason.encode(),
                b"source_id": d.entry_id.encode(),
                b"stream": self.stream.encode(),
                b"consumer": consumer.encode(),
            }
            for k, v in (d.fields or {}).items():
                entry[ORIGINAL_FIELD_PREFIX + k] = v
            pipe.xadd(self.dead_letter_stream, entry)
        await pipe.execute()

    async def read_dead_letters(self, count: int = 1000) -> list[DeadLetterRecord]:
        entries = await self._client.xrange(self.dead_letter_stream, count=count)
        return [
            DeadLetterRecord(
                id=_s(i),
                source_id=_s(f[b"source_id"]),
                payload=f[b"payload"],
                reason=_s(f[b"reason"]),
                consumer=_s(f[b"consumer"]),
                fields={
                    k[len(ORIGINAL_FIELD_PREFIX) :]: v
                    for k, v in f.items()
                    if k.startswith(ORIGINAL_FIELD_PREFIX)
                }
                or None,
            )
            for i, f in entries
        ]

    async def pending_count(self, group: str) -> int:
        from redis.exceptions import ResponseError

        try:
            info = await self._client.xpending(self.stream, group)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return 0
            raise
        return int(info["pending"])

    async def length(self) -> int:
        return int(await self._client.xlen(self.stream))

    async def lag(self, group: str) -> int | None:
        return None  # one shared stream: no per-consumer backlog

    async def undelivered(self, group: str) -> int | None:
        """Entries the group has not read yet (Redis 7's ``XINFO GROUPS`` lag; None when the
        server cannot say).  Not in :class:`EventBus`: the dashboard's heartbeat asks for
        it where a bus has it."""
        for info in await self._client.xinfo_groups(self.stream):
            name = info.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == group:
                lag = info.get("lag")
                return None if lag is None else int(lag)
        return None

    async def read_all(self, count: int | None = None) -> list[BusMessage]:
        """Every entry of the stream, oldest first (inspection, tests)."""
        return _messages(await self._client.xrange(self.stream, count=count))

    async def delete(self) -> None:
        await self._client.delete(self.stream, self.dead_letter_stream)

    async def close(self) -> None:
        await self._client.aclose()
