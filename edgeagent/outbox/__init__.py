"""The durable outbox: results and events are stored in SQLite before they are published and
deleted once the broker acknowledged them (`store`; its contract is at the top of the module),
and `publisher` drains them into the MQTT link."""

from edgeagent.outbox.publisher import OutboxPublisher
from edgeagent.outbox.store import Outbox, OutboxStats

__all__ = ["Outbox", "OutboxPublisher", "OutboxStats"]
