"""The broker's storage: SQLModel tables, migrations, and the store over them (BrokerStore)."""

from broker.store.relay import BrokerStore

__all__ = ["BrokerStore"]
