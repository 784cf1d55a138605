"""One self-contained HTML page per output root: did the run go well, and do the outputs look right?

``daskmv report OUT`` writes ``OUT/report.html``: a summary (rows, errors, pending, time, rows/s,
cluster, pipeline, versions, size on disk), a timeline of partitions per worker and rows/s over time,
errors grouped by kind, and a gallery of sampled rows. Everything is inline (SVG plots, PNG images as
data URLs, no scripts, no external files), so the page opens from disk or object storage.

It reads only the output root, so it works for a finished run, a failed one, and one that was killed
(pending partitions are listed). The gallery asks each op what to show (:meth:`daskmv.ops.Op.gallery`),
so a pipeline adds its own pictures without a switch here.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pandas as pd
import yaml

from daskmv.arrays import read_array_row
from daskmv.errors import PipelineError
from daskmv.failures import error_kind
from daskmv.ops.base import looks_like_image
from daskmv.ops.image import decode_image, read_bytes
from daskmv.paths import resolve_path
from daskmv.store import MANIFEST, RUN_JSON, Store, counts_for, parse_ref

REPORT = "report.html"
THUMB = 192


@dataclass
class RunFacts:
    """What the report shows, read from an output root."""

    store: Store
    run: dict[str, Any]
    status: dict[str, Any]
    markers: list[dict[str, Any]]
    rows: pd.DataFrame
    source: str

    @classmethod
    def read(cls, root: str, storage_options: dict[str, Any] | None = None) -> RunFacts:
        store = Store(root, storage_options)
        status = store.status()  # raises a StoreError for a folder that is not an output root
        run = store.read_json(RUN_JSON) or {}
        markers = sorted((m.info or {} for m in store.markers().values() if counts_for(run, m)),
                         key=lambda m: m.get("index", 0))
        if run.get("state") in ("complete", "incomplete") and store.exists(MANIFEST):
            with store.open(MANIFEST) as fh:
                rows, source = pd.read_parquet(fh), "manifest.parquet"
        else:
            done = [m["index"] for m in markers] + sorted(status["partitions_failed"])
            parts = [store.read_part(i).to_pandas() for i in sorted(done)]
            rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["id", "status", "error"])
            source = f"{len(parts)} finished partition file(s) (the run did not finish)"
        return cls(store, run, status, markers, rows, source)


def build_report(root: str, n: int = 16, seed: int = 0, out: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> str:
    """Write the report for output root ``root`` (default ``root/report.html``); return its path.

    ``storage_options`` open a remote root, as ``daskmv run`` was given them.
    """
    store = Store(root, storage_options)
    run = store.read_json(RUN_JSON) or {}
    page = render_staged(store, run, n=n, seed=seed) if run.get("staged") else render(RunFacts.read(root, storage_options),
                                                                                   n=n, seed=seed)
    target = out or store.url(REPORT)
    if out is None:
        store.write_bytes(REPORT, page.encode())
    else:
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(page)
    return target


def render(facts: RunFacts, n: int = 16, seed: int = 0) -> str:
    sections = [
        _summary(facts),
        _timeline(facts),
        _tuning(facts),
        _errors(facts),
        _gallery(facts, n, seed),
    ]
    return _page(facts.store.root, sections, facts.source)


def _page(root: str, sections: list[str], source: str) -> str:
    title = f"daskmv report: {html.escape(root)}"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_CSS}</style></head><body><h1>{title}</h1>{''.join(sections)}"
            f"<footer>made {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from {html.escape(source)}"
            "</footer></body></html>")


def render_staged(store: Store, run: dict[str, Any], n: int = 16, seed: int = 0) -> str:
    """The report of a pipeline with reshape steps: the root's summary and a table of its stages, then each
    stage that ran ops as its own section (timeline, errors, gallery), read from the stage's folder."""
    status = store.status()
    sections = [_staged_summary(store, run, status)]
    for stage in status["stages"]:
        if stage["state"] == "pending" or stage["pipeline"] == "(reshape)":  # nothing ran: no timeline
            continue
        facts = RunFacts.read(store.url(stage["folder"]), store.storage_options)
        body = _timeline(facts) + _errors(facts) + _gallery(facts, n, seed)
        body = body.replace(" id='", f" id='stage{stage['index']}-")  # ids stay unique on the page
        sections.append(f"<section class='stage' id='stage-{stage['index']}'><h2>Stage {stage['index']}: "
                        f"{html.escape(stage['name'])}</h2><p class='small'>{html.escape(stage['folder'])}</p>"
                        f"{body}</section>")
    return _page(store.root, sections, "the stages' folders")


def _staged_summary(store: Store, run: dict[str, Any], status: dict[str, Any]) -> str:
    recorded = {r["index"]: r for r in run.get("stages", [])}
    cells = [("state", status["state"], "state"), ("rows (last stage)", f"{status['rows']:,}", "rows-total"),
             ("ok", f"{status['ok']:,}", "rows-ok"), ("error", f"{status['error']:,}", "rows-error"),
             ("pending", f"{status['pending']:,}", "rows-pending"),
             ("wall time", f"{run['seconds']:,.1f} s" if run.get("seconds") else "-", "seconds"),
             ("output size", _human(_disk_size(store)), "size"),
             ("manifest", f"{run.get('manifest', {}).get('url', '?')} ({run.get('manifest', {}).get('format', '?')})",
              "manifest"),
             ("pipeline", f"{status['pipeline']} ({status['fingerprint']})", "pipeline")]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td id='{i}'>{html.escape(str(v))}</td></tr>" for k, v, i in cells)
    stage_rows = []
    for stage in status["stages"]:
        record = recorded.get(stage["index"], {})
        ops = ", ".join(step.get("op", "?") for step in record.get("ops", [])) or "-"
        made = (record.get("reshape") or {}).get("reshape", "")
        stage_rows.append(
            f"<tr class='stage-row'><td>{stage['index']}</td><td>{html.escape(stage['name'])}</td>"
            f"<td>{html.escape(made or '-')}</td><td>{html.escape(ops)}</td><td>{html.escape(stage['state'])}</td>"
            f"<td class='count'>{stage['rows']:,}</td><td class='count'>{stage['ok']:,}</td>"
            f"<td class='count'>{stage['error']:,}</td><td class='count'>{stage['pending']:,}</td></tr>")
    steps = yaml.safe_dump(run.get("pipeline", {}).get("steps", []), sort_keys=False)
    versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
    return (f"<section id='summary'><h2>Summary</h2><table class='kv'>{rows}</table>"
            "<h3>Stages</h3><table id='stages'><tr><th>#</th><th>stage</th><th>reshape</th><th>ops</th>"
            "<th>state</th><th>rows</th><th>ok</th><th>error</th><th>pending</th></tr>"
            f"{''.join(stage_rows)}</table><h3>Pipeline steps</h3><pre>{html.escape(steps)}</pre>"
            f"<p class='small'>versions: {html.escape(versions)}</p></section>")


# -- summary ---------------------------------------------------------------------------------------
def summary_numbers(facts: RunFacts) -> dict[str, Any]:
    """The summary's figures (also what ``RunResult._repr_html_`` shows)."""
    status = facts.rows["status"] if "status" in facts.rows else pd.Series(dtype=str)
    total = int(facts.status["rows"])
    ok, errors = int((status == "ok").sum()), int((status == "error").sum())
    seconds = facts.run.get("seconds")
    if seconds is None and facts.markers:
        start = min(_time(m["started"]) for m in facts.markers)
        seconds = (max(_time(m["finished"]) for m in facts.markers) - start).total_seconds()
    computed = sum(int(m.get("processed_rows", m.get("rows", 0))) for m in facts.markers)
    return {
        "state": facts.status["state"], "rows": total, "ok": ok, "error": errors,
        "pending": max(0, total - ok - errors), "seconds": seconds,
        "rows_per_second": facts.run.get("rows_per_second") or (computed / seconds if seconds else None),
        "partitions": facts.status["partitions"], "partitions_done": facts.status["partitions_done"],
        "pending_partitions": _pending_partitions(facts),
    }


def _pending_partitions(facts: RunFacts) -> list[int]:
    done = {m["index"] for m in facts.markers} | set(facts.status["partitions_failed"])
    return [i for i in range(int(facts.status["partitions"])) if i not in done]


def _summary(facts: RunFacts) -> str:
    s = summary_numbers(facts)
    run, cluster = facts.run, facts.run.get("cluster", {})
    size = _disk_size(facts.store)
    rate = f"{s['rows_per_second']:,.1f}" if s["rows_per_second"] else "-"
    cells = [
        ("state", s["state"], "state"), ("rows", f"{s['rows']:,}", "rows-total"), ("ok", f"{s['ok']:,}", "rows-ok"),
        ("error", f"{s['error']:,}", "rows-error"), ("pending", f"{s['pending']:,}", "rows-pending"),
        ("wall time", f"{s['seconds']:,.1f} s" if s["seconds"] else "-", "seconds"),
        ("rows/s", rate, "rows-per-second"),
        ("partitions", f"{s['partitions_done']:,} of {s['partitions']:,} done", "partitions"),
        ("cluster", f"{cluster.get('spec', '?')}: {cluster.get('workers', '?')} worker(s), "
                    f"{cluster.get('threads', '?')} thread(s), {cluster.get('gpu_workers', 0)} with a GPU", "cluster"),
        ("output size", _human(size), "size"),
        ("manifest", f"{run.get('manifest', {}).get('url', '?')} ({run.get('manifest', {}).get('format', '?')})",
         "manifest"),
        ("pipeline", f"{run.get('pipeline', {}).get('name', '?')} ({run.get('pipeline', {}).get('fingerprint', '?')})",
         "pipeline"),
    ]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td id='{i}'>{html.escape(str(v))}</td></tr>" for k, v, i in cells)
    steps = yaml.safe_dump(run.get("pipeline", {}).get("steps", []), sort_keys=False)
    versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
    pending = s["pending_partitions"]
    pending_html = (f"<p class='warn' id='pending-partitions'>pending partitions ({len(pending)}): "
                    f"{html.escape(_ranges(pending))}</p>" if pending else "")
    failed = facts.status["partitions_failed"]
    failed_html = (f"<p class='bad' id='failed-partitions'>partitions given up after retries: "
                   f"{html.escape(_ranges(failed))}</p>" if failed else "")
    return (f"<section id='summary'><h2>Summary</h2><table class='kv'>{rows}</table>{pending_html}{failed_html}"
            f"<h3>Pipeline steps</h3><pre>{html.escape(steps)}</pre>"
            f"<p class='small'>versions: {html.escape(versions)}</p></section>")


def _disk_size(store: Store) -> int:
    try:
        return int(store.fs.du(store.path, total=True))
    except (OSError, NotImplementedError):
        return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _ranges(indices: list[int]) -> str:
    out: list[str] = []
    for i in sorted(indices):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))  # type: ignore[arg-type]
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)  # type: ignore[misc]


# -- timeline --------------------------------------------------------------------------------------
def _time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def _timeline(facts: RunFacts) -> str:
    if not facts.markers:
        return "<section id='timeline'><h2>Timeline</h2><p>No partition has finished yet.</p></section>"
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures stay as they are

    start = min(_time(m["started"]) for m in facts.markers)
    workers = sorted({str(m.get("worker") or m.get("host")) for m in facts.markers})
    lane = {w: i for i, w in enumerate(workers)}
    failures = facts.run.get("failed_attempts", [])
    height = 1.2 + 0.35 * (len(workers) + (1 if failures else 0))
    fig = Figure(figsize=(9, height + 2.2))
    gantt, rate = fig.subplots(2, 1, gridspec_kw={"height_ratios": [height, 2.2]})
    for m in facts.markers:
        t0 = (_time(m["started"]) - start).total_seconds()
        t1 = (_time(m["finished"]) - start).total_seconds()
        color = "#4c78a8" if int(m.get("attempt", 1)) == 1 else "#f58518"
        gantt.barh(lane[str(m.get("worker") or m.get("host"))], max(t1 - t0, 1e-3), left=t0, height=0.7,
                   color=color, edgecolor="white", linewidth=0.5)
    if failures:
        y = len(workers)
        xs = [(_time(f["time"]) - start).total_seconds() for f in failures]
        gantt.scatter(xs, [y] * len(xs), marker="x", color="#e45756", zorder=3)
        workers = [*workers, "failed attempts"]
    gantt.set_yticks(range(len(workers)), [w.replace("tcp://", "") for w in workers], fontsize=7)
    gantt.set_xlabel("seconds since the first partition started (blue: first attempt, orange: a retry)", fontsize=8)
    gantt.set_title("partitions per worker", fontsize=9)
    ends = np.array(sorted((_time(m["finished"]) - start).total_seconds() for m in facts.markers))
    rows_done = np.array([int(m.get("processed_rows", m.get("rows", 0))) for m in
                          sorted(facts.markers, key=lambda m: m["finished"])])
    span = max(float(ends[-1]), 1e-3)
    bins = np.linspace(0, span, min(40, max(2, len(ends))) + 1)
    counts, _ = np.histogram(ends, bins=bins, weights=rows_done)
    rate.step(bins[:-1], counts / np.diff(bins), where="post", color="#54a24b")
    rate.set_ylabel("rows/s", fontsize=8)
    rate.set_xlabel("seconds", fontsize=8)
    rate.set_title("rows finished per second", fontsize=9)
    for ax in (gantt, rate):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline SVG in HTML
    return f"<section id='timeline'><h2>Timeline</h2>{svg}</section>"


# -- tuning ----------------------------------------------------------------------------------------
def _tuning(facts: RunFacts) -> str:
    """The ``daskmv tune`` table these settings came from, as a chart (nothing when the run was not tuned)."""
    tuning = facts.run.get("tuning") or (facts.run.get("options") or {}).get("tuning")
    table = (tuning or {}).get("table") or []
    if not table:
        return ""
    from matplotlib.figure import Figure

    best = tuning.get("best") or {}
    labels, values, colours = [], [], []
    for row in table:
        per_gpu = f"/{row['workers_per_gpu']}pg" if row.get("workers_per_gpu") else ""
        labels.append(f"b{row['batch_size']} w{row['workers']}{per_gpu} t{row['threads_per_worker']}")
        values.append(float(row.get("items_per_second") or 0.0))
        chosen = all(row.get(k) == v for k, v in best.items())
        colours.append("#e45756" if row.get("out_of_memory") else "#54a24b" if chosen else "#4c78a8")
    fig = Figure(figsize=(9, 1.2 + 0.28 * len(table)))
    ax = fig.subplots()
    ax.barh(range(len(values)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("items per second on the sample (green: the settings used; red: out of memory)", fontsize=8)
    ax.set_title(f"daskmv tune on {tuning.get('sample', '?')} rows: batch (b), workers (w), per GPU (pg), "
                 "threads (t)", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return f"<section id='tuning'><h2>Tuning</h2>{svg[svg.index('<svg'):]}</section>"


# -- errors ----------------------------------------------------------------------------------------
def _errors(facts: RunFacts) -> str:
    frame = facts.rows
    if "status" not in frame or not (frame["status"] == "error").any():
        return "<section id='errors'><h2>Errors</h2><p id='no-errors'>No row errors.</p></section>"
    bad = frame[frame["status"] == "error"]
    path_col = facts.run.get("binding", {}).get("path_column", "path")
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for row_id, message, path in zip(bad["id"], bad["error"].fillna(""),
                                     bad[path_col] if path_col in bad else [""] * len(bad)):
        group = groups.setdefault(error_kind(str(message), str(row_id)), [])
        group.append((str(row_id), "" if path is None else str(path)))
    lines = []
    for (kind, text), members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        examples = "<br>".join(html.escape(f"{i}  {p}") for i, p in members[:3])
        lines.append(f"<tr class='error-group'><td class='count'>{len(members):,}</td><td>{html.escape(kind)}</td>"
                     f"<td>{html.escape(text)}</td><td class='small'>{examples}</td></tr>")
    return (f"<section id='errors'><h2>Errors</h2><p>{len(bad):,} row error(s) in {len(groups)} kind(s); "
            "every one is listed in errors.log.</p><table><tr><th>rows</th><th>where</th><th>message</th>"
            f"<th>examples (id, path)</th></tr>{''.join(lines)}</table></section>")


# -- gallery ---------------------------------------------------------------------------------------
def _gallery(facts: RunFacts, n: int, seed: int) -> str:
    ok, picks = sample_ok_rows(facts, n, seed)
    if not len(picks):
        return "<section id='gallery'><h2>Gallery</h2><p>No finished rows to show.</p></section>"
    ops = _ops(facts)
    cards = [_card(ok.iloc[int(i)], row_images(facts, ok.iloc[int(i)], ops)) for i in picks]
    return (f"<section id='gallery'><h2>Gallery</h2><p>{len(cards)} rows sampled at random (seed {seed}) from "
            f"{len(ok):,} ok rows.</p><div class='cards'>{''.join(cards)}</div></section>")


def sample_ok_rows(facts: RunFacts, n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The run's ok rows and ``n`` of their positions drawn with ``seed`` (sorted)."""
    frame = facts.rows
    ok = frame[frame["status"] == "ok"] if "status" in frame else frame.iloc[:0]
    if ok.empty or n <= 0:
        return ok, np.zeros(0, int)
    return ok, np.sort(np.random.default_rng(seed).choice(len(ok), size=min(n, len(ok)), replace=False))


def _ops(facts: RunFacts) -> list[Any]:
    from daskmv.pipeline import Pipeline

    try:
        return Pipeline.from_steps(facts.run.get("pipeline", {}).get("steps", [])).ops
    except (PipelineError, Exception):  # a user's op that does not import here: show arrays as they are
        return []


def row_images(facts: RunFacts, row: pd.Series, ops: list[Any]) -> list[tuple[str, np.ndarray]]:
    """What shows one row's results: its input image (when the pipeline reads images), then each op's
    :meth:`~daskmv.ops.base.Op.gallery` images (every image-like array when the ops cannot be built)."""
    values = {k: row[k] for k in row.index}
    images: list[tuple[str, np.ndarray]] = []
    if any("image" in op.input_names() for op in ops) and not any(op.frame_source for op in ops):
        image = _input_image(facts, values)
        if image is not None:
            images.append(("input", image))
    for column, ref in list(values.items()):
        if column.endswith("_path") and isinstance(ref, str) and "#" in ref:
            try:
                path, r = parse_ref(ref)
                values[column[: -len("_path")]] = read_array_row(_resolve_ref(facts, path), r,
                                                                 facts.store.storage_options or None)
            except (ValueError, OSError, KeyError):
                pass
    if "url" not in values:  # what the loader gave the ops: a gallery that re-reads the file (a video's) uses it
        values["url"] = _input_url(facts, values)
    if ops:
        for op in ops:
            try:
                images += list(op.gallery(values))
            except Exception:  # a broken gallery hook must not break the report
                continue
    else:
        images += [(k, v) for k, v in values.items() if looks_like_image(v)]
    return [(label, img) for label, img in images if looks_like_image(img)]


def _card(row: pd.Series, images: list[tuple[str, np.ndarray]]) -> str:
    tiles = "".join(f"<figure><img alt='{html.escape(label)}' src='{_thumbnail(img)}'><figcaption>{html.escape(label)}"
                    f"</figcaption></figure>" for label, img in images)
    return f"<div class='card'><div class='id'>{html.escape(str(row.get('id')))}</div>{tiles}</div>"


def _resolve_ref(facts: RunFacts, path: str) -> str:
    return path if "://" in path or path.startswith("/") else f"{facts.store.root}/{path}"


def _input_url(facts: RunFacts, values: dict[str, Any]) -> str | None:
    """The row's file, resolved as the run resolved it (against the manifest's folder)."""
    manifest_url = facts.run.get("manifest", {}).get("url", "")
    path_col = facts.run.get("binding", {}).get("path_column", "path")
    path = values.get(path_col)
    if not isinstance(path, str) or not manifest_url:
        return None
    base = manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else ""
    return resolve_path(path, base)


def _input_image(facts: RunFacts, values: dict[str, Any]) -> np.ndarray | None:
    url = _input_url(facts, values)
    if url is None:
        return None
    try:
        return decode_image(read_bytes(url))[0]
    except Exception:  # the input moved or is unreadable here: show the outputs anyway
        return None


def to_display(image: np.ndarray) -> np.ndarray:
    """Any image-like array as RGB uint8 for display (floats in [0, 1] or stretched, 16-bit scaled)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = a.astype(np.float32)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if not (lo >= 0.0 and hi <= 1.0):
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        a = np.clip(np.nan_to_num(a) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return a[..., :3]


def _thumbnail(image: np.ndarray) -> str:
    """A small JPEG of the image as a data URL (thumbnails keep the page light)."""
    rgb = to_display(image)
    h, w = rgb.shape[:2]
    scale = THUMB / max(h, w)
    if scale < 1:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 88])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode()


def summary_html(facts: RunFacts, link: str | None) -> str:
    """A short HTML summary for notebooks (``RunResult._repr_html_``)."""
    s = summary_numbers(facts)
    rate = f"{s['rows_per_second']:,.1f} rows/s" if s["rows_per_second"] else ""
    more = f" &middot; <a href='{html.escape(link)}'>report</a>" if link else ""
    return (f"<div><b>daskmv</b> {html.escape(facts.store.root)}: {html.escape(s['state'])}; "
            f"{s['rows']:,} rows, {s['ok']:,} ok, {s['error']:,} errors, {s['pending']:,} pending; "
            f"{s['seconds'] or 0:,.1f} s {rate}{more}</div>")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px}h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #e2e2e2;padding:4px 8px;text-align:left;
vertical-align:top}table.kv th{background:#f6f6f6;width:140px}.count{text-align:right;font-weight:600}
.small{font-size:11px;color:#555}.warn{color:#a05a00}.bad{color:#b00020}pre{background:#f6f6f6;padding:8px;
font-size:12px}.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;padding:6px;
border-radius:4px}.card .id{font-size:11px;color:#555;margin-bottom:4px}figure{display:inline-block;
margin:0 6px 0 0;text-align:center}figure img{height:160px;width:auto;max-width:240px;display:block;
image-rendering:auto}
figcaption{font-size:11px;color:#555}svg{max-width:100%;height:auto}footer{margin-top:32px;font-size:11px;
color:#777}
"""
