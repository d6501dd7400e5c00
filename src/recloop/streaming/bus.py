"""Compatibility module: the buses live in :mod:`recloop.streaming.buses` (base, redis,
kafka, memory); these names keep working."""

from recloop.streaming.buses.base import (
    DEFAULT_DEAD_LETTER_STREAM,
    DEFAULT_STREAM,
    ORIGINAL_FIELD_PREFIX,
    PAYLOAD_FIELD,
    DeadLetterRecord,
    EventBus,
    is_in_process,
    open_bus,
)
from recloop.streaming.buses.memory import MemoryBus
from recloop.streaming.buses.redis import RedisStreamBus, _messages

__all__ = [
    "DEFAULT_DEAD_LETTER_STREAM",
    "DEFAULT_STREAM",
    "ORIGINAL_FIELD_PREFIX",
    "PAYLOAD_FIELD",
    "DeadLetterRecord",
    "EventBus",
    "MemoryBus",
    "RedisStreamBus",
    "_messages",
    "is_in_process",
    "open_bus",
]
