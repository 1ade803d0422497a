"""The node's storage: SQLModel tables, migrations, and the encrypted case store over them."""
