"""Create the memory collection: named vectors `image` and `text`, cosine, HNSW, optional int8.

The settings fixed at creation are recorded with the memory (so a reopened memory searches as it was
built), and the collection gets a fresh uid (so ledgers of a deleted collection are not reused).
"""

import uuid

from . import LAYOUT_FIELDS, MigrationContext


def upgrade(ctx: MigrationContext) -> None:
    if ctx.backend.has_collection():
        return
    if ctx.dim is None:
        raise ValueError("cannot create the memory collection: embedding dimension unknown "
                         "(pass --dim / an encoder, or ingest data first)")
    ctx.backend.create_collection(ctx.dim, ctx.cfg)
    ctx.backend.meta_set("layout", {k: getattr(ctx.cfg, k) for k in LAYOUT_FIELDS})
    ctx.backend.meta_set("collection_uid", str(uuid.uuid4()))
