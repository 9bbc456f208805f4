"""Record the settings of a collection created before they were recorded (reco-qdrant 0.1).

Only what the engine itself can tell is recorded: the quantization, read back from the collection,
which decides how it is searched (int8 is searched with rescoring). Points are untouched.
"""

import uuid

from . import MigrationContext


def upgrade(ctx: MigrationContext) -> None:
    b = ctx.backend
    if not b.has_collection():
        return
    if b.meta_get("layout") is None:
        b.meta_set("layout", {"quantization": b.stored_quantization()})
    if b.meta_get("collection_uid") is None:
        b.meta_set("collection_uid", str(uuid.uuid4()))
