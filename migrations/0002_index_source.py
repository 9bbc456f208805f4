"""Keyword payload index on `source`, so filtering or deleting by source stays fast."""

from . import MigrationContext


def upgrade(ctx: MigrationContext) -> None:
    ctx.backend.create_payload_index("source")
