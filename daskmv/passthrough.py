"""Pass-through columns of finished partitions: the manifest's columns that no op writes.

A resumed run keeps a finished partition's outputs when only such columns changed (a caption fixed, a
column added), but the output manifest must carry their new values. The driver hashes each partition's
rows (:func:`inputs_hash`, recorded in its marker) and rewrites the part file of a partition whose hash
changed (:func:`refresh_inputs`), its outputs untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.ipc  # noqa: F401  (pa.ipc)

from daskmv.ops.base import Output
from daskmv.partition import select_columns, written_columns
from daskmv.store import PARTS, Marker, Store, attempt_name, new_token, now, partition_name


def inputs_hash(rows: pa.Table) -> str:
    """A digest of every column of a partition's rows (the Arrow IPC encoding of their values, types and
    names): tells a resumed run that pass-through columns changed (the outputs stay valid; the manifest must
    carry the new values). A different chunking of equal values may give another digest; that only
    rewrites the partition's rows once more, never recomputes them."""
    sink = pa.BufferOutputStream()
    table = rows.combine_chunks().replace_schema_metadata(None)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:20]


def refresh_inputs(store: Store, marker: Marker, rows: pa.Table, specs: Sequence[Output],
                   export: str | None, digest: str) -> Marker:
    """Rewrite a finished partition's rows with the manifest's current pass-through columns (its outputs
    unchanged) as a new part file, and point its marker there."""
    written = written_columns(specs, export)
    old = store.read_part_file(marker.part)
    table = select_columns(rows, [c for c in rows.column_names if c not in written])
    for name in old.column_names:
        if name in written:
            table = table.append_column(name, old.column(name))
    part = store.write_part(attempt_name(marker.index, new_token()), table)
    doc = {**(marker.info or {}), "part": part, "inputs_hash": digest, "inputs_refreshed": now()}
    store.write_json(f"{PARTS}/{partition_name(marker.index)}.json", doc)
    return Marker.from_json(doc)
