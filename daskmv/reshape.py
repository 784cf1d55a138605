"""Reshape steps: where one row becomes many (``explode``), many become one (``group``), or rows become pairs
(``pairs``). They sit between ops in a pipeline and cut it into stages (see :mod:`daskmv.stages`).

A reshape is a table-to-table function that runs on the driver, over the previous stage's output manifest,
with pyarrow's vectorised kernels (no Python loop over rows; ``pairs`` loops over groups). Its input is the
previous manifest with its ``status``/``error`` folded into one ``upstream_error`` column (null for rows that
were fine): a failed row never disappears, it is carried into the new rows (a failed image makes its pairs
fail, is listed as failed in its group, and a failed video keeps one error row when exploded).

New rows get deterministic string ids made from their parents' ids:

- ``group``: the key's value (``scene_7``);
- ``explode``: ``<parent id>-<prefix><index>`` (``clip3-f000012``);
- ``pairs``: ``<id_a>|<id_b>``, ``a`` before ``b`` in manifest order.

Every reshape is a few calls on tables of ids, paths and references, so it costs the driver about what a
pyarrow group-by or join of the manifest's identifying columns costs: 435,000 pairs of 1,000 scenes in about
a second (benchmarks/stages.py). Manifests too large for the driver (beyond some tens of millions of rows)
are not reshaped in tasks yet: split them into several runs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from daskmv.errors import PipelineError
from daskmv.ops.base import Param

#: The column that carries a parent row's failure into the rows made from it.
UPSTREAM_ERROR = "upstream_error"

RESHAPES: dict[str, type[Reshape]] = {}


def register_reshape(cls: type[Reshape]) -> type[Reshape]:
    RESHAPES[cls.name] = cls
    return cls


class Reshape:
    """Base class of reshape steps: named parameters checked when built, like an op's."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise PipelineError(f"step {self.name!r} has no parameter {', '.join(unknown)} "
                                f"(parameters: {', '.join(self.params) or 'none'})")
        values = {key: spec.default for key, spec in self.params.items()}
        values.update(params)
        for key, spec in self.params.items():
            if spec.choices is not None and values[key] not in spec.choices:
                raise PipelineError(f"step {self.name!r}: {key}={values[key]!r} is not one of "
                                    f"{', '.join(map(repr, spec.choices))}")
            if key in params:
                spec.check(self.name, key, values[key])
        self.config: dict[str, Any] = values
        self.check_params()

    def check_params(self) -> None:
        """Validate ``self.config``; raise PipelineError with the fix in the message."""

    def spec(self) -> dict[str, Any]:
        return {"reshape": self.name, "params": self.config}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def check(self, columns: list[str]) -> None:
        """Refuse a table that lacks a column this step needs (before anything runs)."""

    def run(self, table: pa.Table) -> pa.Table:
        """The reshaped table; ``table`` needs an ``id`` column and may have ``upstream_error``."""
        self.check(table.column_names)
        table = _normalised(table)
        return self.apply(table)

    def apply(self, table: pa.Table) -> pa.Table:
        """The reshaped table (its ``id`` and ``upstream_error`` columns are strings)."""
        raise NotImplementedError

    def partition_key(self) -> str | None:
        """The column whose equal values the next stage keeps in one task (None: any split)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"


def _normalised(table: pa.Table) -> pa.Table:
    """``id`` and ``upstream_error`` as strings (the error column added, all null, when missing)."""
    ids = table.column("id").cast(pa.string())
    table = table.set_column(table.column_names.index("id"), "id", ids)
    if UPSTREAM_ERROR not in table.column_names:
        return table.append_column(UPSTREAM_ERROR, pa.nulls(table.num_rows, pa.string()))
    i = table.column_names.index(UPSTREAM_ERROR)
    return table.set_column(i, UPSTREAM_ERROR, table.column(UPSTREAM_ERROR).cast(pa.string()))


def _need(step: str, columns: list[str], *names: str | None) -> None:
    missing = [n for n in names if n and n not in columns]
    if missing:
        raise PipelineError(f"step {step!r} needs the column(s) {', '.join(map(repr, missing))}, which the rows "
                            f"before it do not have (columns: {', '.join(columns)})")


@register_reshape
class Group(Reshape):
    name = "group"
    help = "Rows sharing a key become one row whose other columns are lists (ids, paths, ..., in manifest order)."
    params = {"by": Param("scene", "the key column"),
              "default_group": Param(None, "when the rows have no `by` column, they are all this one group "
                                     "(none: a missing column is an error)", types=(str, type(None)))}

    def check(self, columns: list[str]) -> None:
        if self.config["default_group"] is None:
            _need(self.name, columns, self.config["by"])

    def apply(self, table: pa.Table) -> pa.Table:
        by = self.config["by"]
        table = _with_default_group(table, by, self.config["default_group"])
        key = pc.fill_null(table.column(by).cast(pa.string()), "")
        order = np.arange(table.num_rows)
        work = table.drop_columns([by]).append_column("_key", key).append_column("_order", pa.array(order))
        others = [c for c in table.column_names if c not in (by,)]
        grouped = work.select(["_key", "_order"]).group_by("_key", use_threads=False).aggregate(
            [("_order", "min"), ("_order", "list")])
        grouped = grouped.take(pc.sort_indices(grouped.column("_order_min")))
        keys = grouped.column("_key")
        firsts = grouped.column("_order_min").to_numpy()
        members = grouped.column("_order_list").combine_chunks()  # row numbers of each group, in manifest order
        take = pc.list_flatten(members)
        offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(members).to_numpy(zero_copy_only=False))])

        def listed(name: str) -> pa.Array:  # any column type, lists and structs too (hash_list has no kernel)
            values = table.column(name).take(take).combine_chunks()
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)

        errors = listed(UPSTREAM_ERROR)
        n = pc.list_value_length(errors)
        ok = pc.subtract(n, _count_non_null(errors))
        first = pc.fill_null(pc.list_element(pc.fill_null(errors, pa.scalar([""], errors.type)), 0), "")
        whole = pc.if_else(pc.and_(pc.equal(ok, 0), pc.greater(n, 0)),
                           pc.binary_join_element_wise(pa.scalar("all "), pc.cast(n, pa.string()),
                                                       pa.scalar(" rows of this group failed upstream (first: "),
                                                       first, pa.scalar(")"), ""),
                           pa.nulls(len(keys), pa.string()))
        columns = {"id": keys, by: table.column(by).take(pa.array(firsts)), "ids": listed("id"),
                   "n": n, "n_ok": ok}
        for c in others:
            if c in ("id", UPSTREAM_ERROR):
                continue
            columns[c] = listed(c)
        columns["errors"] = errors
        columns[UPSTREAM_ERROR] = whole
        return pa.table(columns)


def _count_non_null(lists: pa.ChunkedArray) -> pa.Array:
    """How many non-null values each list holds."""
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    counts = np.bincount(parents.to_numpy()[pc.is_valid(flat).to_numpy(zero_copy_only=False)],
                         minlength=len(lists))
    return pa.array(counts.astype(np.int64))


@register_reshape
class Explode(Reshape):
    name = "explode"
    help = ("A list column (or several of equal lengths, element by element) becomes one row per element (id "
            "<parent>-<prefix><index>); struct elements become columns.")
    params = {
        "column": Param("items", "the list column, or a list of list columns exploded together",
                        types=(str, list, tuple)),
        "prefix": Param("", "put before the element's index in the new ids (frames use 'f')"),
        "parent_column": Param("parent_id", "the column holding the parent row's id (frames use 'video_id')"),
    }

    def check_params(self) -> None:
        columns = self.columns
        if not columns or not all(isinstance(c, str) and c for c in columns):
            raise PipelineError(f"step 'explode': column must name one or more list columns, not {self.config['column']!r}")

    @property
    def columns(self) -> list[str]:
        column = self.config["column"]
        return [column] if isinstance(column, str) else list(column)

    def check(self, columns: list[str]) -> None:
        _need(self.name, columns, *self.columns)

    def partition_key(self) -> str | None:
        return self.config["parent_column"]

    def apply(self, table: pa.Table) -> pa.Table:
        names = self.columns
        lists = [self._lists(table, name) for name in names]
        lengths = pc.fill_null(pc.list_value_length(lists[0]), 0).to_numpy(zero_copy_only=False)
        for name, other in zip(names[1:], lists[1:]):
            if not np.array_equal(pc.fill_null(pc.list_value_length(other), 0).to_numpy(zero_copy_only=False), lengths):
                raise PipelineError(f"step 'explode': columns {names[0]!r} and {name!r} hold lists of different "
                                    "lengths; columns exploded together must match element by element")
        keep = np.maximum(lengths, 1)  # a parent with no elements (or failed) keeps one row
        parents = np.repeat(np.arange(table.num_rows), keep)
        starts = np.concatenate([[0], np.cumsum(keep)[:-1]])
        index = np.arange(len(parents)) - np.repeat(starts, keep)
        real = np.repeat(lengths > 0, keep)
        positions = np.full(len(parents), -1, dtype=np.int64)
        positions[real] = np.arange(int(real.sum()))
        base = table.drop_columns(names).take(pa.array(parents))
        parent_ids = base.column("id")
        index_col = pa.array(np.where(real, index, -1)).cast(pa.int64())
        index_col = pc.if_else(pa.array(real), index_col, pa.nulls(len(parents), pa.int64()))
        suffix = pc.binary_join_element_wise(pa.scalar(f"-{self.config['prefix']}"),
                                             pc.utf8_lpad(pc.cast(pa.array(index), pa.string()), 6, "0"), "")
        ids = pc.binary_join_element_wise(parent_ids, suffix, "")
        upstream = base.column(UPSTREAM_ERROR)
        empty = f"no elements in {names[0]!r}"
        upstream = pc.if_else(pa.array(real), upstream, pc.fill_null(upstream, empty))
        out = base.drop_columns(["id", UPSTREAM_ERROR])
        parent = self.config["parent_column"]
        if parent in out.column_names:
            out = out.drop_columns([parent])
        out = out.add_column(0, "id", ids).add_column(1, parent, parent_ids).add_column(2, "index", index_col)
        for name, values in zip(names, lists):
            values = pc.list_flatten(values)  # only non-empty lists contribute, in order
            element = (values.take(pa.array(np.where(real, positions, 0))) if len(values)
                       else pa.nulls(len(parents), values.type))
            element = pc.if_else(pa.array(real), element, pa.nulls(len(parents), element.type))
            if pa.types.is_struct(element.type):
                for i in range(element.type.num_fields):
                    out = out.append_column(element.type.field(i).name, pc.struct_field(element, [i]))
            else:
                out = out.append_column(name, element)
        return out.append_column(UPSTREAM_ERROR, upstream)

    @staticmethod
    def _lists(table: pa.Table, column: str) -> pa.Array:
        lists = table.column(column).combine_chunks()
        if pa.types.is_string(lists.type) or pa.types.is_large_string(lists.type):
            lists = _parse_json_lists(lists, column)  # an op's "json" output column
        if not pa.types.is_list(lists.type) and not pa.types.is_large_list(lists.type):
            raise PipelineError(f"step 'explode': column {column!r} holds {lists.type}, not lists")
        return lists


def _parse_json_lists(texts: pa.Array, column: str) -> pa.Array:
    """A column of JSON lists (one parse per parent row) as an Arrow list array; objects become structs."""
    values = []
    for text in texts.to_pylist():
        value = json.loads(text) if text else None
        if value is not None and not isinstance(value, list):
            raise PipelineError(f"step 'explode': column {column!r} holds {type(value).__name__}s, not lists")
        values.append(value)
    return pa.array(values)


MODES = ("exhaustive", "sequential", "retrieval", "auto", "column")
#: Modes whose ``column`` is an embedding (consumed by the step: pair rows do not carry it).
EMBEDDING_MODES = ("sequential", "retrieval", "auto")


@register_reshape
class Pairs(Reshape):
    name = "pairs"
    help = ("Rows become pairs within each group: exhaustive (all), sequential (each row and the next `window`, "
            "plus its `k` nearest by the embedding in `column` when given: loop closures), retrieval (each row and "
            "its `k` nearest by the embedding in `column`), or column (each row and the ids listed in `column`); "
            "columns get _a/_b suffixes, id <id_a>|<id_b>; a row in no pair keeps one error row, id <id>|.")
    params = {
        "by": Param(None, "the group column (none: all rows are one group)", types=(str, type(None))),
        "default_group": Param(None, "when the manifest has no `by` column, every row is in this group "
                               "(none: a missing column is an error)", types=(str, type(None))),
        "mode": Param("exhaustive", "how pairs are chosen", MODES),
        "window": Param(1, "sequential: how many following rows each row pairs with"),
        "k": Param(20, "retrieval (and sequential with a column): nearest neighbours per row"),
        "exhaustive_up_to": Param(40, "auto: exhaustive for groups of up to this many rows, retrieval above"),
        "column": Param(None, "retrieval/sequential: the embedding column (lists of numbers); column mode: the "
                        "column listing each row's candidate ids", types=(str, type(None))),
    }

    def check_params(self) -> None:
        if self.config["window"] < 1:
            raise PipelineError(f"step 'pairs': window must be at least 1, not {self.config['window']}")
        if self.config["k"] < 1:
            raise PipelineError(f"step 'pairs': k must be at least 1, not {self.config['k']}")
        if self.config["mode"] in ("column", "retrieval", "auto") and not self.config["column"]:
            what = "the embedding column" if self.config["mode"] != "column" else "the list of candidate ids"
            raise PipelineError(f"step 'pairs': mode {self.config['mode']!r} needs column=<{what}>")

    def consumed_column(self) -> str | None:
        """The embedding column, which is not copied onto the pair rows (None: none). Exhaustive mode does not
        read it, but the column named is an embedding all the same (the sfm pipeline names ``global`` for
        every mode): copied, it was 8 KB on each pair row and every one of them again in a scene's row."""
        return self.config["column"] if self.config["mode"] != "column" else None

    def check(self, columns: list[str]) -> None:
        by = None if self.config["default_group"] is not None else self.config["by"]
        _need(self.name, columns, by, self.config["column"] if self.config["mode"] != "exhaustive" else None)

    def apply(self, table: pa.Table) -> pa.Table:
        table = _with_default_group(table, self.config["by"], self.config["default_group"])
        a, b = self.pair_indices(table)
        by = self.config["by"]
        left = table.take(pa.array(a))
        right = table.take(pa.array(b, mask=b < 0))  # -1: a row in no pair, its _b side null
        ids = pc.binary_join_element_wise(left.column("id"), right.column("id"), "|",
                                          null_handling="replace", null_replacement="")
        columns: dict[str, Any] = {"id": ids}
        if by:
            columns[by] = left.column(by)
        consumed = self.consumed_column()
        for name in table.column_names:
            if name in (by, UPSTREAM_ERROR, consumed):
                continue
            columns[f"{name}_a"] = left.column(name)
            columns[f"{name}_b"] = right.column(name)
        columns[UPSTREAM_ERROR] = self._pair_errors(left, right)
        return pa.table(columns)

    def pair_indices(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers (a, b) of every pair, group by group in order of first appearance, a before b; then,
        in its group, each row that is in no pair as (row, -1), so that it stays visible downstream."""
        by, mode = self.config["by"], self.config["mode"]
        n = table.num_rows
        if by:
            codes = pc.dictionary_encode(pc.fill_null(table.column(by).cast(pa.string()), "")).combine_chunks()
            group = codes.indices.to_numpy(zero_copy_only=False)
        else:
            group = np.zeros(n, dtype=np.int64)
        order = np.argsort(group, kind="stable")  # rows of each group, in manifest order
        bounds = np.flatnonzero(np.diff(group[order])) + 1
        candidates = self._candidates(table) if mode == "column" else None
        embeddings = self._embeddings(table) if mode in EMBEDDING_MODES and self.config["column"] else None
        parts_a, parts_b = [], []
        for members in np.split(order, bounds) if n else []:
            i, j = self._within(members, candidates)
            if embeddings is not None and (mode != "auto" or len(members) > self.config["exhaustive_up_to"]):
                i, j = _union_pairs(i, j, *nearest_pairs(embeddings[members], self.config["k"]))
            lone = np.setdiff1d(np.arange(len(members)), np.concatenate([i, j]))
            parts_a += [members[i], members[lone]]
            parts_b += [members[j], np.full(len(lone), -1, dtype=np.int64)]
        if not parts_a:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(parts_a), np.concatenate(parts_b)

    def _pair_errors(self, left: pa.Table, right: pa.Table) -> pa.ChunkedArray:
        """Which side failed upstream and why; for a row in no pair, why it has none."""
        why = ("none of its candidates is in its group" if self.config["mode"] == "column"
               else "no other row of its group to pair with")
        lone = pc.binary_join_element_wise(left.column("id"), pa.scalar(f": in no pair ({why})"), "")
        failed = _either_failed(left, right)
        return pc.if_else(pc.is_null(right.column("id")), pc.coalesce(failed, lone), failed)

    def _within(self, members: np.ndarray, candidates: list[set[str]] | None) -> tuple[np.ndarray, np.ndarray]:
        k = len(members)
        mode = self.config["mode"]
        if mode == "exhaustive" or (mode == "auto" and k <= self.config["exhaustive_up_to"]):
            return np.triu_indices(k, 1)
        if mode in ("retrieval", "auto"):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)  # the nearest neighbours are added by the caller
        if mode == "sequential":
            w = min(self.config["window"], max(k - 1, 0))
            i = np.concatenate([np.arange(k - o) for o in range(1, w + 1)]) if w else np.zeros(0, np.int64)
            j = np.concatenate([np.arange(o, k) for o in range(1, w + 1)]) if w else np.zeros(0, np.int64)
            order = np.lexsort((j, i))
            return i[order], j[order]
        assert candidates is not None
        ids = candidates[-1]  # the ids of every row, by row number (see _candidates)
        position = {ids[m]: p for p, m in enumerate(members)}
        found = set()
        for p, m in enumerate(members):
            for other in candidates[m]:
                q = position.get(other)
                if q is not None and q != p:
                    found.add((min(p, q), max(p, q)))
        pairs = np.array(sorted(found), dtype=np.int64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    def _candidates(self, table: pa.Table) -> list[Any]:
        """Each row's candidate ids as a set, then (last) the list of every row's id."""
        lists = table.column(self.config["column"]).to_pylist()
        if any(v is not None and not isinstance(v, list) for v in lists):
            raise PipelineError(f"step 'pairs': column {self.config['column']!r} must hold lists of ids")
        return [set(v or ()) for v in lists] + [table.column("id").to_pylist()]


    def _embeddings(self, table: pa.Table) -> np.ndarray:
        """Each row's embedding as a row of a float32 matrix (NaN for a row with none)."""
        column = self.config["column"]
        values = table.column(column).to_pylist()
        sizes = {len(v) for v in values if v is not None and isinstance(v, (list, tuple))}
        if len(sizes) > 1 or any(v is not None and not isinstance(v, (list, tuple)) for v in values):
            raise PipelineError(f"step 'pairs': column {column!r} must hold embeddings: lists of numbers, all of "
                                "one length")
        d = sizes.pop() if sizes else 1
        out = np.full((len(values), d), np.nan, np.float32)
        for k, v in enumerate(values):
            if v is not None:
                out[k] = v
        return out


def nearest_pairs(embeddings: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows where one is among the other's ``k`` nearest by cosine similarity. Rows with no
    embedding (NaN) pair with nothing. Memory: ``block`` rows of similarities at a time."""
    valid = np.flatnonzero(np.isfinite(embeddings).all(axis=1))
    n = len(valid)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    X = embeddings[valid].astype(np.float32)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    k = min(k, n - 1)
    found_i, found_j = [], []
    for s in range(0, n, block):
        sim = X[s : s + block] @ X.T
        rows = np.arange(s, min(s + block, n))
        sim[rows - s, rows] = -np.inf  # never oneself
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        found_i.append(np.repeat(rows, k))
        found_j.append(nearest.ravel())
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    lo, hi = valid[np.minimum(i, j)], valid[np.maximum(i, j)]
    return _union_pairs(lo, hi, np.zeros(0, np.int64), np.zeros(0, np.int64))


def _union_pairs(i: np.ndarray, j: np.ndarray, i2: np.ndarray, j2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs of both lists (each with i < j), sorted."""
    pairs = np.unique(np.stack([np.concatenate([i, i2]), np.concatenate([j, j2])], axis=1).astype(np.int64), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _with_default_group(table: pa.Table, by: str | None, default: str | None) -> pa.Table:
    """``table`` with a ``by`` column of ``default`` everywhere when it has none (and a default is given)."""
    if by and default is not None and by not in table.column_names:
        column = pa.array([default] * table.num_rows, pa.string())
        if UPSTREAM_ERROR in table.column_names:
            return table.add_column(table.column_names.index(UPSTREAM_ERROR), by, column)
        return table.append_column(by, column)
    return table


def _either_failed(left: pa.Table, right: pa.Table) -> pa.ChunkedArray:
    """The pair's upstream error: which side failed and why (null when both are fine)."""
    ea, eb = left.column(UPSTREAM_ERROR), right.column(UPSTREAM_ERROR)
    ia, ib = left.column("id"), right.column("id")
    text_a = pc.binary_join_element_wise(ia, pa.scalar(": "), ea, "")
    text_b = pc.binary_join_element_wise(ib, pa.scalar(": "), eb, "")
    both = pc.binary_join_element_wise(text_a, text_b, "; ")
    return pc.if_else(pc.is_valid(ea), pc.if_else(pc.is_valid(eb), both, text_a), text_b)


def get_reshape(name: str) -> type[Reshape] | None:
    return RESHAPES.get(name)
