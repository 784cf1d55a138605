"""Pass-through columns of finished partitions: the manifest's columns that no op writes.

A resumed run keeps a finished partition's outputs when only such columns changed (a caption fixed, a
column added), but the output manifest must carry their new values. The driver hashes each partition's
rows (:func:`inputs_hash`, recorded in its marker) and rewrites the part file of a partition whose hash
changed (:func:`refresh_inputs`), its outputs untouched. Driver-side only: workers never import pandas.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pandas as pd
import pyarrow as pa

from daskmv.ops.base import Output
from daskmv.partition import written_columns
from daskmv.store import PARTS, Marker, Store, attempt_name, new_token, now, partition_name


def inputs_hash(rows: pd.DataFrame) -> str:
    """A digest of every column of a partition's rows, as text: tells a resumed run that pass-through
    columns changed (the outputs stay valid; the manifest must carry the new values)."""
    hashable = rows.astype({c: str for c, t in rows.dtypes.items() if t == object})  # lists after `group`
    hashes = pd.util.hash_pandas_object(hashable, index=False).to_numpy(dtype="<u8")
    names = "\x1f".join(f"{c}:{t}" for c, t in rows.dtypes.items()).encode()
    return hashlib.sha256(names + hashes.tobytes()).hexdigest()[:20]


def refresh_inputs(store: Store, marker: Marker, rows: pd.DataFrame, specs: Sequence[Output],
                   export: str | None, digest: str) -> Marker:
    """Rewrite a finished partition's rows with the manifest's current pass-through columns (its outputs
    unchanged) as a new part file, and point its marker there."""
    written = written_columns(specs, export)
    old = store.read_part_file(marker.part)
    table = pa.Table.from_pandas(rows[[c for c in rows.columns if c not in written]], preserve_index=False)
    for name in old.column_names:
        if name in written:
            table = table.append_column(name, old.column(name))
    part = store.write_part(attempt_name(marker.index, new_token()), table)
    doc = {**(marker.info or {}), "part": part, "inputs_hash": digest, "inputs_refreshed": now()}
    store.write_json(f"{PARTS}/{partition_name(marker.index)}.json", doc)
    return Marker.from_json(doc)
