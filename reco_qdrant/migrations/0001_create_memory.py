"""Create the memory collection: named vectors `image` and `text`, cosine, HNSW, optional int8."""

from . import MigrationContext


def upgrade(ctx: MigrationContext) -> None:
    if ctx.backend.has_collection():
        return
    if ctx.dim is None:
        raise ValueError("cannot create the memory collection: embedding dimension unknown "
                         "(pass --dim / an encoder, or ingest data first)")
    ctx.backend.create_collection(ctx.dim, ctx.cfg)
