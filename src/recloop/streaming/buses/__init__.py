"""Event buses behind one protocol (:class:`EventBus`): Redis Streams, Kafka, in-process."""

from recloop.streaming.buses.base import (
    DEFAULT_STREAM,
    DeadLetterRecord,
    EventBus,
    is_in_process,
    open_bus,
)
from recloop.streaming.buses.memory import MemoryBus
from recloop.streaming.buses.redis import RedisStreamBus

__all__ = [
    "DEFAULT_STREAM",
    "DeadLetterRecord",
    "EventBus",
    "MemoryBus",
    "RedisStreamBus",
    "is_in_process",
    "open_bus",
]
