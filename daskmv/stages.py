"""Pipelines with reshape steps, run as a chain of ordinary runs: one per stage, each in its own folder.

```
out/
  run.json                            the plan, its stages (name, folder, fingerprint, counts), timings
  manifest.parquet                    the last stage's rows, references relative to out/ (csv twin, errors.log)
  stages/0-features-3f9c1a2b/         an ordinary output root: run.json, parts/, outputs.zarr/, manifest
  stages/1-pairs-match-77d0e4c1/      input.parquet (the rows the reshape made) + an ordinary output root
  stages/2-group-reconstruct-0a1b2c3d/
```

A stage's folder name ends with its fingerprint, which chains every step before it: a changed parameter of
the first step gives every stage a new folder (all recomputed), a changed parameter of the last step only
the last. Folders of stages no longer in the plan are removed when a run completes. Each stage resumes like
any run, so killing a run in stage 3 and running it again skips stages 1-2 (every partition already marked)
and the finished partitions of stage 3.

A reshape runs on the driver over the previous stage's manifest (see :mod:`daskmv.reshape`); rows that
failed upstream are carried as errors, never dropped. File paths keep resolving against the original
manifest's folder; references to arrays and artifacts of earlier stages are made absolute in a stage's input
and relative to ``out/`` in the top-level manifest, so the root can still move as a whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from daskmv.assemble import ManifestWriter
from daskmv.cluster import connect
from daskmv.errors import StoreError, TooManyRowErrors, UsageError
from daskmv.failures import read_log
from daskmv.manifest import Manifest, read_manifest
from daskmv.pipeline import Plan, Stage
from daskmv.progress import RunProgress
from daskmv.reshape import UPSTREAM_ERROR, Explode, Group, Pairs
from daskmv.store import LAYOUT, MANIFEST, OWNED, RUN_JSON, STAGES, Store, now

if TYPE_CHECKING:
    from distributed import Client

    from daskmv.engine import RunOptions, RunResult

INPUT = "input.parquet"
_DROPPED = ("status", "error", "seconds", UPSTREAM_ERROR)


def stage_fingerprint(chain: str, stage: Stage) -> str:
    """A stage's fingerprint: what came before it, its reshape and its ops."""
    blob = json.dumps({"after": chain, "stage": stage.spec()}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def run_stages(manifest: str | Manifest, plan: Plan, out: str, client: Client | None, opts: RunOptions) -> RunResult:
    """Run ``plan`` stage by stage into ``out``; return the last stage's result (with every stage's)."""
    from daskmv.engine import canonical_url, diagnosed

    if opts.export:
        raise UsageError("--export is not available for pipelines with reshape steps yet; export from the last "
                         "stage's root with an ordinary run")
    progress = RunProgress(opts.progress)  # type: ignore[arg-type]
    source = manifest if isinstance(manifest, Manifest) else read_manifest(
        manifest, path_column=opts.path_column, id_column=opts.id_column, limit=opts.limit,
        storage_options=opts.storage_options, check=False)
    _validate(plan, source)
    store = Store(out, opts.storage_options)
    store.acquire_lock()
    t0 = time.perf_counter()
    try:
        binding = {"layout": LAYOUT, "staged": True, "manifest": canonical_url(source.url),
                   "id_column": source.id_column, "path_column": source.path_column}
        _prepare(store, binding, opts.overwrite)
        with diagnosed(), connect(client or opts.cluster, workers=opts.workers,
                                  threads_per_worker=opts.threads_per_worker, workers_per_gpu=opts.workers_per_gpu
                                  if opts.workers_per_gpu != "auto" else None, note=progress.note,
                                  **opts.cluster_kwargs) as c:
            runner = _Stages(store, plan, source, c, opts, progress)
            runner.announce(binding)
            results = runner.run()
            return runner.publish(binding, results, time.perf_counter() - t0)
    finally:
        try:
            store.release_lock()
        except OSError:
            pass


def _prepare(store: Store, binding: dict[str, Any], overwrite: bool) -> None:
    previous = store.read_json(RUN_JSON)
    if overwrite:
        for name in OWNED:
            store.remove(name)
        return
    if previous is None:
        if store.exists(STAGES) or store.exists("parts"):
            raise StoreError(f"{store.root} holds outputs but no {RUN_JSON}; use --overwrite or another --out")
        return
    old = previous.get("binding", {})
    diffs = [k for k in binding if old.get(k) != binding[k]]
    if diffs:
        lines = "; ".join(f"{k}: {old.get(k)!r} there, {binding[k]!r} now" for k in diffs)
        raise StoreError(f"output root {store.root} was made by a different run ({lines}); use another --out, "
                         "or --overwrite to replace it")


def _validate(plan: Plan, source: Manifest) -> None:
    """Check every stage's inputs against the columns the stages before it make, before anything runs."""
    columns: list[str] | None = list(dict.fromkeys(["id", *source.columns]))
    path_column = source.path_column
    for stage in plan.stages:
        if stage.reshape is not None:
            if columns is not None:
                stage.reshape.check(columns)
            columns = _columns_after(stage.reshape, columns)
            path_column = "path"
        pipeline = stage.pipeline("")
        if pipeline is not None and columns is not None:
            replaced = set(pipeline.validate(columns, path_column))
            columns = [c for c in columns if c not in replaced] + pipeline.output_columns
        if columns is not None:
            columns = [c for c in columns if c not in _DROPPED] + [UPSTREAM_ERROR]


def _columns_after(reshape: Any, columns: list[str] | None) -> list[str] | None:
    """The columns a reshape makes of ``columns`` (None when they depend on the data, as after ``explode``)."""
    if columns is None or isinstance(reshape, Explode):
        return None
    rest = [c for c in columns if c not in ("id", UPSTREAM_ERROR)]
    if isinstance(reshape, Group):
        by = reshape.config["by"]
        return ["id", by, "ids", "n", "n_ok", *[c for c in rest if c != by], "errors", UPSTREAM_ERROR]
    if isinstance(reshape, Pairs):
        by = reshape.config["by"]
        consumed = reshape.consumed_column()
        sides = [f"{c}_{s}" for c in ["id", *[c for c in rest if c not in (by, consumed)]] for s in "ab"]
        return ["id", *([by] if by else []), *sides, UPSTREAM_ERROR]
    return None


class _Stages:
    """The chain: reshape, run, fold the results into the next stage's rows."""

    def __init__(self, store: Store, plan: Plan, source: Manifest, client: Client, opts: RunOptions,
                 progress: RunProgress) -> None:
        self.store, self.plan, self.source, self.client = store, plan, source, client
        self.opts, self.progress = opts, progress
        self.refs: set[str] = set()  # columns holding references to arrays or artifacts of earlier stages
        self.records: list[dict[str, Any]] = []
        self.chains: list[str] = []
        chain = ""
        for stage in plan.stages:
            chain = stage_fingerprint(chain, stage)
            self.chains.append(chain)
        self.folders = [f"{STAGES}/{k}-{stage.name}-{chain[:8]}"
                        for k, (stage, chain) in enumerate(zip(plan.stages, self.chains))]

    def announce(self, binding: dict[str, Any]) -> None:
        """run.json as the run starts: the plan and its stages' folders (what ``daskmv status`` reads)."""
        self.store.write_json(RUN_JSON, self._run_doc(binding, "running", [
            {"index": k, "name": stage.name, "folder": folder, "fingerprint": chain}
            for k, (stage, folder, chain) in enumerate(zip(self.plan.stages, self.folders, self.chains))]))

    def _run_doc(self, binding: dict[str, Any], state: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
        from daskmv.engine import versions

        return {"state": state, "staged": True, "started": now(), "binding": binding,
                "pipeline": {"name": self.plan.name, "fingerprint": self.chains[-1],
                             "steps": [item.spec() for item in self.plan.items]},
                "stages": stages,
                "manifest": {"url": self.source.url, "format": self.source.format, "rows": self.source.n_rows},
                "versions": versions()}

    def run(self) -> list[RunResult]:
        from daskmv.engine import _run

        results: list[RunResult] = []
        previous = None
        n = len(self.plan.stages)
        for k, stage in enumerate(self.plan.stages):
            chain, folder = self.chains[k], self.folders[k]
            self.progress.note(f"stage {k + 1}/{n}: {stage.name} ({folder})")
            manifest = self.source
            if stage.reshape is not None:
                manifest = self._reshape(stage, previous, folder)
            pipeline = stage.pipeline(chain)
            opts = self._options(k, stage)
            if pipeline is None:
                result = self._rows_only(manifest, folder, chain)
            else:
                result = _run(manifest, pipeline, self.store.url(folder), self.client, opts,
                              manifest_key=f"stage {k} input" if stage.reshape is not None else None)
                self.refs |= {s.column for s in pipeline.outputs if s.kind in ("array", "artifact")}
            self._check_error_rate(stage, folder, result)
            self.records.append({"index": k, "name": stage.name, "folder": folder, "fingerprint": chain,
                                 "reshape": stage.reshape.spec() if stage.reshape else None,
                                 "ops": [op.spec() for op in stage.ops], "counts": result.counts,
                                 "computed_partitions": len(result.computed_partitions),
                                 "skipped_partitions": len(result.skipped_partitions)})
            results.append(result)
            previous = folder
        return results

    def _options(self, k: int, stage: Stage) -> RunOptions:
        derived = stage.reshape is not None
        return dataclasses.replace(
            self.opts, overwrite=False, max_error_rate=1.0, progress=self.opts.progress,
            limit=self.opts.limit if not derived else None,
            partition_by=stage.reshape.partition_key() if derived else self.opts.partition_by,
            path_column="path" if derived else self.opts.path_column, id_column="id" if derived else self.opts.id_column)

    # -- reshaping ---------------------------------------------------------------------------------
    def _reshape(self, stage: Stage, previous: str | None, folder: str) -> Manifest:
        """The rows the stage's reshape makes of the previous stage's (or the input) manifest, written as
        ``<folder>/input.parquet``, and opened as this stage's manifest."""
        table = self._previous_rows(previous)
        reshaped = stage.reshape.run(table)  # type: ignore[union-attr]
        self.refs = _renamed_refs(stage.reshape, self.refs)
        sink = pa.BufferOutputStream()
        pq.write_table(reshaped, sink, compression="zstd")
        self.store.write_bytes(f"{folder}/{INPUT}", sink.getvalue().to_pybytes())
        manifest = read_manifest(self.store.url(folder, INPUT), path_column="path", id_column="id",
                                 storage_options=self.opts.storage_options, check=False)
        manifest.base = self.source.base  # file paths keep resolving against the original manifest's folder
        return manifest

    def _previous_rows(self, previous: str | None) -> pa.Table:
        """The rows before a reshape, their status folded into ``upstream_error``, references made absolute."""
        if previous is None:  # the plan starts with a reshape: the input manifest's rows, with ids
            frames = [pa.Table.from_pandas(df, preserve_index=False)
                      for df in self.source.check().partitions(1 << 16)]
            return pa.concat_tables(frames, promote_options="permissive")
        with self.store.open(f"{previous}/{MANIFEST}") as fh:
            table = pq.read_table(fh)
        failed = pc.equal(table.column("status"), "error")
        error = pc.replace_substring_regex(table.column("error").cast(pa.string()), "^upstream: ", "")
        upstream = pc.if_else(failed, error, pa.nulls(table.num_rows, pa.string()))
        table = table.drop_columns([c for c in _DROPPED if c in table.column_names])
        table = table.append_column(UPSTREAM_ERROR, upstream)
        prefix = self.store.url(previous) + "/"
        return _map_refs(table, self.refs, lambda col: _prefixed(col, prefix))

    def _rows_only(self, manifest: Manifest, folder: str, chain: str) -> RunResult:
        """A stage with no ops (the plan ends with a reshape): its rows are the reshape's, errors carried."""
        from daskmv.engine import RunResult

        with self.store.open(f"{folder}/{INPUT}") as fh:
            table = pq.read_table(fh)
        upstream = table.column(UPSTREAM_ERROR)
        status = pc.if_else(pc.is_valid(upstream), "error", "ok")
        error = pc.binary_join_element_wise(pa.scalar("upstream: "), upstream, "")
        table = table.drop_columns([UPSTREAM_ERROR]).append_column("status", status).append_column("error", error)
        table = table.append_column("seconds", pa.array([0.0] * table.num_rows))
        root = Store(self.store.url(folder), self.opts.storage_options)
        writer = ManifestWriter(root, csv=False)
        writer.add(table, {"time": now()})  # errors.log: carried errors, logged by the driver (worker -)
        counts = writer.commit()
        root.write_json(RUN_JSON, {"state": "complete", "kind": "reshape only", "fingerprint": chain,
                                   "finished": now(), "counts": counts})
        return RunResult(out=root.root, manifest_path=root.url(MANIFEST), fingerprint=chain, counts=counts,
                         seconds=0.0, computed_partitions=[], skipped_partitions=[], failed_partitions=[])

    def _check_error_rate(self, stage: Stage, folder: str, result: RunResult) -> None:
        """Stop the chain when a stage's own row errors (not those carried from upstream) pass the limit."""
        with self.store.open(f"{folder}/{MANIFEST}") as fh:
            table = pq.read_table(fh, columns=["status", "error"])
        own = pc.and_(pc.equal(table.column("status"), "error"),
                      pc.invert(pc.starts_with(pc.fill_null(table.column("error"), ""), "upstream: ")))
        errors, rows = pc.sum(own).as_py() or 0, table.num_rows
        if rows and errors / rows > self.opts.max_error_rate:
            raise TooManyRowErrors(
                f"stage {stage.name!r}: {errors:,} of {rows:,} rows failed ({errors / rows:.1%}), more than "
                f"--max-error-rate {self.opts.max_error_rate:g}; the later stages were not run. Its rows are in "
                f"{self.store.url(folder, MANIFEST)} (errors.log beside it)", result)

    # -- the root's own files ----------------------------------------------------------------------
    def publish(self, binding: dict[str, Any], results: list[RunResult], seconds: float) -> RunResult:
        """The last stage's rows as the root's manifest (references relative to the root), run.json, and
        the folders of stages no longer in the plan removed."""
        from daskmv.engine import RunResult

        last = self.records[-1]["folder"]
        with self.store.open(f"{last}/{MANIFEST}") as fh:
            table = pq.read_table(fh)
        root = self.store.url() + "/"
        table = _map_refs(table, self.refs, lambda col: _rooted(col, root, f"{last}/"))
        ops = self.plan.stages[-1].ops
        if ops:
            outputs = {spec.column for op in ops for spec in op.output_specs()} | {"status", "error", "seconds"}
            inputs = [c for c in table.column_names if c not in outputs]
            for op in ops:  # every op of the last stage may drop input columns (a scene's lists of pairs)
                inputs = op.published_columns(inputs)
            table = table.select([c for c in table.column_names if c in outputs or c in inputs])
        # errors.log: each failed row with the time and worker its stage logged
        stage = Store(self.store.url(last), self.opts.storage_options)
        logged = {f.id: (f.time, f.worker) for f in read_log(stage)}
        writer = ManifestWriter(self.store, csv=self.source.format == "csv")
        try:
            writer.add(table, {"by_id": logged})
            counts = writer.commit()
        finally:
            writer.abort()
        keep = {r["folder"].split("/", 1)[1] for r in self.records}
        for name in self.store._listing(STAGES):
            if name not in keep:
                self.store.remove(f"{STAGES}/{name}")
        final = results[-1]
        doc = self._run_doc(binding, "complete", self.records)
        doc.update(finished=now(), seconds=round(seconds, 3), counts=counts)
        self.store.write_json(RUN_JSON, doc)
        return RunResult(out=self.store.root, manifest_path=self.store.url(MANIFEST),
                         fingerprint=self.records[-1]["fingerprint"], counts=counts, seconds=seconds,
                         computed_partitions=final.computed_partitions, skipped_partitions=final.skipped_partitions,
                         failed_partitions=final.failed_partitions, storage_options=self.opts.storage_options,
                         stages=results)


def _renamed_refs(reshape: Any, refs: set[str]) -> set[str]:
    """Reference columns after a reshape (``pairs`` suffixes them with _a and _b)."""
    if isinstance(reshape, Pairs):
        return {f"{c}_{side}" for c in refs for side in "ab"}
    return set(refs)


def _map_refs(table: pa.Table, columns: set[str], fn: Any) -> pa.Table:
    """Apply ``fn`` to every reference column (strings, or lists of strings after ``group``)."""
    for name in sorted(columns & set(table.column_names)):
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            values = fn(pc.list_flatten(column).cast(pa.string()))
            mapped = pa.ListArray.from_arrays(column.offsets, values, mask=pc.is_null(column))
        else:
            mapped = fn(column.cast(pa.string()))
        table = table.set_column(table.column_names.index(name), name, mapped)
    return table


def _is_absolute(col: pa.Array) -> pa.Array:
    return pc.or_(pc.starts_with(col, "/"), pc.match_substring(col, "://"))


def _prefixed(col: pa.Array, prefix: str) -> pa.Array:
    """Relative references made absolute with ``prefix`` (the folder of the manifest they were relative to)."""
    return pc.if_else(_is_absolute(col), col, pc.binary_join_element_wise(pa.scalar(prefix), col, ""))


def _rooted(col: pa.Array, root: str, folder: str) -> pa.Array:
    """References relative to the root: absolute ones inside it lose the root, the last stage's own gain its folder."""
    inside = pc.starts_with(col, root)
    stripped = pc.utf8_slice_codeunits(col, len(root))
    relative = pc.binary_join_element_wise(pa.scalar(folder), col, "")
    return pc.if_else(inside, stripped, pc.if_else(_is_absolute(col), col, relative))
