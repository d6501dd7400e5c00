"""The stream processor: events from a bus into the behaviour log, popular items, recent items
and refreshed recommendations; and the replay producer that feeds it a prepared dataset.

Loads artifacts only; never imports training code.
"""

from recloop.streaming.buses import EventBus, MemoryBus, RedisStreamBus, open_bus
from recloop.streaming.events import BusMessage, DeadLetter, ParsedBatch, encode_events, parse_batch
from recloop.streaming.log import BehaviorLog, log_tables
from recloop.streaming.settings import StreamSettings, load_stream_settings

__all__ = [
    "BehaviorLog",
    "BusMessage",
    "DeadLetter",
    "EventBus",
    "MemoryBus",
    "ParsedBatch",
    "RedisStreamBus",
    "StreamSettings",
    "encode_events",
    "load_stream_settings",
    "log_tables",
    "open_bus",
    "parse_batch",
]
