"""The ``daskmv`` command: run, validate, status, ops.

Exit codes are a contract for scripts: 0 the run completed (row errors are summarised, not fatal),
2 bad input or usage (nothing ran), 1 the run could not complete (running again resumes), 3 the run
completed but more rows failed than ``--max-error-rate`` allows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from daskmv.errors import DaskmvError, TooManyRowErrors, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Batch-process manifests of images and videos on Dask clusters.")
err = Console(stderr=True)
out = Console()

#: Run settings a --config YAML file may hold (dashes or underscores); command-line flags win.
CONFIG_KEYS = {
    "pipeline", "out", "cluster", "workers", "threads_per_worker", "partition_rows", "batch_size",
    "decode_threads", "decode_scale", "path_column", "id_column", "limit", "overwrite", "retry_errors", "retries",
    "retry_delay", "window", "require_gpu", "progress", "storage_options", "cluster_kwargs", "export",
    "max_error_rate", "worker_wait", "partition_by", "workers_per_gpu", "tuning",
}


def _fail(exc: DaskmvError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


def _read_config(path: Optional[Path]) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read --config {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"--config {path} must be a mapping of settings")
    doc = {str(k).replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(doc) - CONFIG_KEYS)
    if unknown:
        raise UsageError(f"--config {path}: unknown setting(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(CONFIG_KEYS))})")
    if isinstance(doc.get("pipeline"), str) and doc["pipeline"].endswith((".yaml", ".yml")):
        candidate = path.parent / doc["pipeline"]
        if candidate.exists():
            doc["pipeline"] = str(candidate)
    return doc


@app.command()
def run(
    manifest: str = typer.Argument(..., help="CSV or Parquet manifest: a path or any fsspec URL."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help="Comma list of ops, or a pipeline YAML file."),
    out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="Output root (path or fsspec URL)."),
    cluster: Optional[str] = typer.Option(None, help="'local' (default) or a scheduler address tcp://host:port."),
    workers: Optional[int] = typer.Option(None, help="Local worker processes (default: one per core, or per GPU)."),
    workers_per_gpu: Optional[str] = typer.Option(None, "--workers-per-gpu", help="GPU worker processes per GPU: N, "
                                                  "or auto (add one at a time while each fits and adds throughput)."),
    threads_per_worker: Optional[int] = typer.Option(None, "--threads-per-worker", help="Threads per worker "
                                                     "process (default 1)."),
    partition_rows: Optional[int] = typer.Option(None, help="Rows per task (default: automatic, at most 256)."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per micro-batch inside a task (default 32; a batch "
                                             "also ends at 4 MB of decoded images, 256 MB on a GPU)."),
    path_column: Optional[str] = typer.Option(None, help="Column with file paths (default 'path')."),
    id_column: Optional[str] = typer.Option(None, help="Column with row ids (default: 'id', else derived from paths)."),
    config: Optional[Path] = typer.Option(None, help="YAML file of run settings; flags override it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what a previous run left in --out."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Recompute only rows whose status is error."),
    limit: Optional[int] = typer.Option(None, help="Run only the first N rows."),
    retries: Optional[int] = typer.Option(None, help="Retries of a failed partition, with back-off (default 3)."),
    decode_threads: Optional[int] = typer.Option(None, help="File read/decode threads per worker (default 2)."),
    decode_scale: Optional[int] = typer.Option(None, help="Decode images at 1/2, 1/4 or 1/8 size (JPEG: much "
                                               "faster); for ops that only need a small image. Default 1."),
    require_gpu: bool = typer.Option(False, "--require-gpu", help="Refuse to run GPU ops on CPU workers."),
    progress: Optional[str] = typer.Option(None, help="auto, bar, notebook, log or none."),
    report: bool = typer.Option(False, "--report", help="Write OUT/report.html when the run ends."),
    export: Optional[str] = typer.Option(None, "--export", help="Also write image outputs as files: png "
                                         "(OUT/png/...; manifest.csv then points at them)."),
    max_error_rate: Optional[float] = typer.Option(None, help="Exit 3 when more than this fraction of the rows "
                                                   "failed (default 0.1; 1 never)."),
    partition_by: Optional[str] = typer.Option(None, help="Keep the rows sharing this column's value in one task "
                                               "(they must be consecutive in the manifest)."),
) -> None:
    """Run a pipeline over every row of MANIFEST, writing outputs and a new manifest into --out."""
    from daskmv.engine import run as run_pipeline

    root = out_dir
    try:
        settings = _read_config(config)
        flags = {
            "pipeline": pipeline, "out": out_dir, "cluster": cluster, "workers": workers,
            "partition_rows": partition_rows, "batch_size": batch_size, "path_column": path_column,
            "id_column": id_column, "limit": limit, "retries": retries, "decode_threads": decode_threads,
            "decode_scale": decode_scale,
            "progress": progress, "export": export, "max_error_rate": max_error_rate, "partition_by": partition_by,
            "workers_per_gpu": workers_per_gpu, "threads_per_worker": threads_per_worker,
        }
        settings.update({k: v for k, v in flags.items() if v is not None})
        for key, value in (("overwrite", overwrite), ("retry_errors", retry_errors), ("require_gpu", require_gpu)):
            if value:
                settings[key] = True
        spec = settings.pop("pipeline", None)
        root = settings.pop("out", None)
        if not spec:
            raise UsageError("no pipeline: give --pipeline resize,stats (see `daskmv ops`) or a YAML file")
        if not root:
            raise UsageError("no output root: give --out DIR")
        result = run_pipeline(manifest, spec, root, **settings)
    except TooManyRowErrors as exc:
        out.print(f"[bold yellow]done, with too many row errors:[/] {escape(exc.result.summary())}",
                  highlight=False, soft_wrap=True)
        if report:
            _try_report(exc.result.out)
        raise _fail(exc) from None
    except DaskmvError as exc:
        if report and root:
            _try_report(root)
        raise _fail(exc) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted:[/] finished partitions are kept; run the same command to resume")
        raise typer.Exit(1) from None
    out.print(f"[bold green]done:[/] {escape(result.summary())}", highlight=False, soft_wrap=True)
    if result.counts.get("error"):
        out.print(f"row errors are listed in {result.out}/errors.log", highlight=False, soft_wrap=True)
    if report:
        _try_report(result.out)


def _try_report(root: str) -> None:
    from daskmv.report import build_report

    try:
        out.print(f"report: {build_report(root)}", highlight=False, soft_wrap=True)
    except DaskmvError as exc:
        err.print(f"no report: {escape(str(exc))}", highlight=False)


STORAGE_OPTIONS_HELP = ("fsspec options of a remote root, as JSON (e.g. '{\"anon\": true}'); "
                        "they override --config's storage_options.")
CONFIG_HELP = "The YAML file of run settings (as `daskmv run --config`): its storage_options are used."


def _storage_options(text: Optional[str], config: Optional[Path]) -> dict[str, Any]:
    """The storage options for reading a root: --config's ``storage_options``, then --storage-options."""
    options = dict(_read_config(config).get("storage_options") or {})
    if text:
        try:
            given = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--storage-options is not JSON: {exc}") from None
        if not isinstance(given, dict):
            raise UsageError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
        options.update(given)
    return options


@app.command("report")
def report_cmd(
    root: str = typer.Argument(..., help="An output root."),
    n: int = typer.Option(16, "--n", help="Rows in the gallery."),
    seed: int = typer.Option(0, help="Seed of the gallery's sample."),
    to: Optional[str] = typer.Option(None, "--to", help="Write here instead of ROOT/report.html."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help=STORAGE_OPTIONS_HELP),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
) -> None:
    """Write ROOT/report.html: summary, timeline, errors and a gallery, in one self-contained file."""
    from daskmv.report import build_report

    try:
        path = build_report(root, n=n, seed=seed, out=to, storage_options=_storage_options(storage_options, config))
    except DaskmvError as exc:
        raise _fail(exc) from None
    out.print(f"report: {path}", highlight=False, soft_wrap=True)


@app.command()
def preview(
    root: str = typer.Argument(..., help="An output root."),
    n: int = typer.Option(16, "--n", help="Rows on the sheet."),
    seed: int = typer.Option(0, help="Seed of the sample."),
    tile: int = typer.Option(192, help="Tile size in pixels."),
    to: Optional[str] = typer.Option(None, "--to", help="Write here instead of ROOT/preview.png."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help=STORAGE_OPTIONS_HELP),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
) -> None:
    """Write ROOT/preview.png: a contact sheet of sampled rows (input, then each op's images)."""
    from daskmv.preview import contact_sheet

    try:
        path = contact_sheet(root, n=n, seed=seed, out=to, tile=tile,
                             storage_options=_storage_options(storage_options, config))
    except DaskmvError as exc:
        raise _fail(exc) from None
    out.print(f"preview: {path}", highlight=False, soft_wrap=True)


@app.command()
def validate(
    manifest: str = typer.Argument(..., help="CSV or Parquet manifest: a path or any fsspec URL."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help="Also check this pipeline's inputs."),
    path_column: str = typer.Option("path", help="Column with file paths."),
    id_column: Optional[str] = typer.Option(None, help="Column with row ids."),
) -> None:
    """Run the pre-flight checks alone: columns, ids, URL schemes, and the pipeline's inputs."""
    from daskmv.manifest import read_manifest
    from daskmv.pipeline import Pipeline

    try:
        m = read_manifest(manifest, path_column=path_column, id_column=id_column)
        lines = [f"manifest {m.url}: {m.n_rows:,} rows, {m.format}, columns {', '.join(m.columns)}",
                 f"ids: {'column ' + repr(m.id_column) if m.id_column else 'derived from ' + repr(m.path_column)}"]
        if pipeline:
            p = Pipeline.parse(pipeline)
            replaced = p.validate(m.columns, m.path_column)
            lines.append(f"pipeline {p.name} ({p.fingerprint}): inputs ok; outputs {', '.join(p.output_columns)}")
            if replaced:
                lines.append(f"note: outputs replace the manifest column(s) {', '.join(replaced)}")
    except DaskmvError as exc:
        raise _fail(exc) from None
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)
    out.print("[bold green]ok[/]")


@app.command()
def status(
    root: str = typer.Argument(..., help="An output root."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help=STORAGE_OPTIONS_HELP),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    gc: bool = typer.Option(False, "--gc", help="Also remove the files of attempts no marker references "
                            "(partitions written twice, attempts killed mid-write)."),
    grace: Optional[float] = typer.Option(None, help="With --gc: an attempt whose lease was refreshed in the "
                                          "last GRACE seconds (default 300) may still be running and is kept."),
    errors: bool = typer.Option(False, "--errors", help="Also list the failed rows (errors.log) and failed "
                                "partition attempts, grouped by kind, most frequent first."),
) -> None:
    """Done, failed and pending rows of an output root: during a run, after it, or after a crash.

    With --errors, also every failed row (and failed partition attempt) grouped by kind: count, kind (op and
    exception type), a message, when, which workers, example ids.
    """
    from daskmv.failures import failed_attempts, group_failures, iter_failures
    from daskmv.store import LEASE_TIMEOUT, Store

    try:
        store = Store(root, _storage_options(storage_options, config))
        info = store.status()
        if gc:
            grace = LEASE_TIMEOUT if grace is None else grace
            if grace < 0:
                raise UsageError(f"--grace {grace}: must be at least 0 seconds")
            info["garbage"] = store.collect_garbage(lease_timeout=grace)
        if errors:
            info["errors"] = group_failures(iter_failures(store), failed_attempts(store))
    except DaskmvError as exc:
        raise _fail(exc) from None
    except (OSError, TypeError) as exc:  # the filesystem would not open (missing or wrong storage options)
        raise _fail(UsageError(f"cannot read {root}: {type(exc).__name__}: {exc}")) from None
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    out.print(f"[bold]{info['root']}[/]: {info['state']}; pipeline {info['pipeline']} ({info['fingerprint']})",
              highlight=False, soft_wrap=True)
    out.print(f"rows {info['rows']:,}: done {info['done']:,} (ok {info['ok']:,}, error {info['error']:,}), "
              f"failed {info['failed']:,}, pending {info['pending']:,}", highlight=False)
    failed = f", failed {len(info['partitions_failed'])}" if info["partitions_failed"] else ""
    out.print(f"partitions {info['partitions_done']:,}/{info['partitions']:,} done{failed}", highlight=False)
    for stage in info.get("stages", []):
        out.print(f"  stage {stage['index']} {stage['name']}: {stage['state']}; rows {stage['rows']:,}, done "
                  f"{stage['done']:,} (ok {stage['ok']:,}, error {stage['error']:,}), pending {stage['pending']:,}"
                  f"  ({stage['folder']})", highlight=False, soft_wrap=True, markup=False)
    if gc:
        garbage = info["garbage"]
        out.print(f"garbage: removed {len(garbage['attempts']):,} attempt(s), {garbage['bytes'] / 1e6:,.1f} MB",
                  highlight=False)
    if errors:
        _print_errors(info["errors"])


def _print_errors(groups: list[dict[str, Any]]) -> None:
    """The failure groups of ``daskmv status --errors``: failed rows, then failed partition attempts."""
    for level in ("row", "partition"):
        mine = [g for g in groups if g["level"] == level]
        if not mine and level == "partition":
            continue
        count = sum(g["count"] for g in mine)
        if level == "row":
            title = f"{count:,} failed row(s) in {len(mine)} kind(s)" if mine else "no failed rows"
        else:
            title = f"{count:,} failed partition attempt(s) in {len(mine)} kind(s)"
        out.print(f"[bold]{title}[/]", highlight=False)
        if not mine:
            continue
        table = Table(show_lines=True)
        table.add_column("rows" if level == "row" else "attempts", justify="right", no_wrap=True)
        table.add_column("kind, message, " + ("example ids" if level == "row" else "partitions"), ratio=1,
                         overflow="fold")
        table.add_column("first / last (UTC)", no_wrap=True)
        table.add_column("workers", no_wrap=True)
        for g in mine:
            what = f"[bold]{escape(g['kind'])}[/]\n{escape(_detail(g['kind'], g['message']))}"
            if g["ids"]:
                what += f"\n[dim]{escape(', '.join(g['ids']))}[/]"
            when = "\n".join(dict.fromkeys(_short_time(t) for t in (g["first"], g["last"]) if t)) or "-"
            workers = g["workers"][:4] + ([f"and {len(g['workers']) - 4} more"] if len(g["workers"]) > 4 else [])
            table.add_row(f"{g['count']:,}", what, when, escape("\n".join(workers) or "-"))
        out.print(table)


def _detail(kind: str, message: str) -> str:
    """A group's message without what its kind already says (``read: ``, ``op: ValueError: ``)."""
    op, _, exc = kind.partition(": ")
    for prefix in (f"{kind}: ", f"{op}: ", f"{exc}: "):
        if prefix != ": " and message.startswith(prefix):
            return message[len(prefix):]
    return message


def _short_time(stamp: str) -> str:
    """``2025-01-07 10:42:13`` of an ISO time stamp (seconds are enough on a terminal)."""
    return stamp.replace("T", " ")[:19]


@app.command("tune")
def tune_cmd(
    manifest: str = typer.Argument(..., help="CSV or Parquet manifest: a path or any fsspec URL."),
    pipeline: str = typer.Option(..., "--pipeline", "-p", help="Comma list of ops, or a pipeline YAML file."),
    sample: int = typer.Option(8, help="Rows of the manifest (its first ones) each setting runs."),
    write_config: Path = typer.Option(Path("tuned.yaml"), "--write-config", help="Where to write the best settings "
                                      "(a daskmv run --config file)."),
    max_batch: int = typer.Option(256, help="The largest batch size to try."),
    max_workers: Optional[int] = typer.Option(None, help="The most workers (CPU) or workers per GPU to try."),
    cluster: Optional[str] = typer.Option(None, help="'local' (default) or a scheduler address."),
    path_column: Optional[str] = typer.Option(None, help="Column with file paths (default 'path')."),
    id_column: Optional[str] = typer.Option(None, help="Column with row ids."),
) -> None:
    """Measure batch size, then workers (per GPU, or processes and threads on CPU) on a sample; print the table,
    the full run's estimated time, and write the best row as a --config file."""
    from daskmv.tune import tune

    options = {k: v for k, v in {"cluster": cluster, "path_column": path_column, "id_column": id_column}.items()
               if v is not None}
    if pipeline.endswith((".yaml", ".yml")) and Path(pipeline).is_file():
        pipeline = str(Path(pipeline).resolve())
    try:
        result = tune(manifest, pipeline, sample=sample, max_batch=max_batch, max_workers=max_workers,
                      config=str(write_config), note=lambda line: err.print(f"[dim]{escape(line)}[/]", highlight=False),
                      **options)
    except DaskmvError as exc:
        raise _fail(exc) from None
    table = Table(title=f"daskmv tune: {sample} row(s) of {result.rows:,}")
    for column in ("batch", "workers", "per GPU", "threads", "items/s", "host MB", "device MB", "note"):
        table.add_column(column, justify="right" if column not in ("note",) else "left")
    for t in result.trials:
        mark = "[bold green]" if t is result.best else ""
        table.add_row(*(f"{mark}{v}" for v in (t.batch_size, t.workers, t.workers_per_gpu or "-", t.threads_per_worker,
                                                f"{t.items_per_second:,.1f}", t.peak_host_mb or "-",
                                                t.peak_device_mb or "-", escape(t.note or ("best" if t is result.best else "")))))
    out.print(table)
    hours = result.estimated_seconds / 3600
    out.print(f"best: {result.best.settings()} at {result.best.items_per_second:,.1f} items/s; the full manifest "
              f"({result.rows:,} rows, ~{result.items_per_row:,.1f} items each) would take about "
              f"{hours:,.2f} h ({result.estimated_seconds:,.0f} s)", highlight=False, soft_wrap=True)
    out.print(f"settings written to {write_config}: daskmv run {manifest} --config {write_config} --out OUT",
              highlight=False, soft_wrap=True)


@app.command("ops")
def list_ops() -> None:
    """List every op with its inputs, outputs and parameters."""
    from daskmv.ops import LOADER_INPUTS, REGISTRY
    from daskmv.pipeline import PIPELINES

    for name in sorted(REGISTRY):
        op = REGISTRY[name]
        out.print(f"[bold]{name}[/]{' [magenta](gpu)[/]' if op.gpu else ''}  {escape(op.help)}", highlight=False)
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column()
        grid.add_column()
        grid.add_row("  inputs", ", ".join(op.inputs) or "-", "")
        outputs = ", ".join(f"{o.column} ({o.dtype}{' array' if o.kind == 'array' else ''})" for o in op.outputs)
        grid.add_row("  outputs", outputs or "set by parameters", "")
        for i, (key, param) in enumerate(op.params.items()):
            choices = f" ({', '.join(map(str, param.choices))})" if param.choices else ""
            grid.add_row("  params" if i == 0 else "", escape(f"{key} = {param.default!r}"), escape(param.help + choices))
        out.print(grid)
    from daskmv.reshape import RESHAPES

    for name in sorted(RESHAPES):
        step = RESHAPES[name]
        out.print(f"[bold]{name}[/] [cyan](reshape)[/]  {escape(step.help)}", highlight=False)
        for key, param in step.params.items():
            choices = f" ({', '.join(map(str, param.choices))})" if param.choices else ""
            out.print(f"    {escape(f'{key} = {param.default!r}')}  {escape(param.help + choices)}", highlight=False)
    if PIPELINES:
        out.print("[bold]named pipelines[/]: " + "; ".join(
            f"{k} = {', '.join(s['op'] for s in v)}" for k, v in sorted(PIPELINES.items())), highlight=False)
    out.print("[dim]inputs made from each row's file:[/] " + escape("; ".join(f"{k}: {v}" for k, v in LOADER_INPUTS.items())),
              highlight=False)
    out.print("[dim]a user op is named by import path, e.g.[/] --pipeline mypkg.ops:Blur", highlight=False)


def main() -> None:
    import distributed  # noqa: F401  (sets up its loggers first, so the levels below stick)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("distributed", "dask"):  # the scheduler runs in this process: keep its INFO lines out
        logging.getLogger(name).setLevel(logging.WARNING)
    # A lost scheduler makes the client log each failed reconnection with a traceback; the run reports it
    # itself, in one line that says what to do.
    logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
    app()


if __name__ == "__main__":
    main()
