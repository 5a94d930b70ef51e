"""The durable outbox: results and events are stored in SQLite before they are published and
deleted once the broker acknowledged them (`store`; its contract is at the top of the module)."""

from edgeagent.outbox.store import Outbox, OutboxPublisher, OutboxStats

__all__ = ["Outbox", "OutboxPublisher", "OutboxStats"]
