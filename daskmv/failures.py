"""Failed rows, as ``errors.log`` records them, and the one rule that groups failures by kind.

``errors.log`` starts with a header line, then has one tab-separated line per failed row::

    # time  worker  id  op  message
    2025-01-07T10:42:13.418+00:00  tcp://10.0.0.7:40911  img_0007-3fa2b1c9d0e1f2a3  read  file not found: /data/7.jpg

``time`` is when the row's partition finished (ISO-8601, UTC), ``worker`` the Dask worker that ran it
(both from the partition's marker; a partition the driver gave up on has its failure record's time and
worker ``-``); ``-`` stands for anything unknown, and tabs or line breaks inside a field become spaces.
Roots written before the header existed have three columns (id, op, message) and still read. The report
(errors by kind) and ``daskmv status --errors`` group with :func:`error_kind`, so both show the same groups.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from daskmv.store import Store

HEADER = "# time\tworker\tid\top\tmessage\n"
UNKNOWN = "-"
#: Dask addresses in an error message (a KilledWorker names the last worker, a SetupFailed its worker).
_ADDRESS = re.compile(r"\b(?:tcp|tls|inproc|ucx|ws|wss)://[\w.\-\[\]:]+\w")

_NOISE = [
    (re.compile(r"(?:[A-Za-z]:)?(?:/[^\s:'\"]+)+"), "<path>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    (re.compile(r"\b\d+(?:\.\d+)?\b"), "<n>"),
]


def error_kind(message: str, row_id: str | None = None) -> tuple[str, str]:
    """(where and what: "op: Type", normalised message) for grouping row errors.

    Paths, quoted strings, numbers and the row's own id (``row_id``, when given and of 4 characters or more)
    are normalised, so the same failure of many rows is one group.
    """
    op, _, rest = message.partition(": ")
    kind, sep, text = rest.partition(": ")
    if not sep or not re.match(r"^[A-Z]\w*(Error|Exception|Worker|Warning)?$", kind):
        kind, text = "", rest
    if row_id and len(row_id) >= 4:
        text = re.sub(rf"(?<![\w-]){re.escape(row_id)}(?![\w-])", "<id>", text)
    for pattern, repl in _NOISE:
        text = pattern.sub(repl, text)
    return (f"{op}: {kind}" if kind else op), text.strip()


@dataclass
class Failure:
    """One failed row: when and where its partition ran (None: unknown), its id, op and message.

    ``kind`` ("op: ExceptionType", or the op alone) and ``pattern`` (the message with paths, numbers and
    quoted strings normalised) are :func:`error_kind`'s; failures of one kind and pattern are one group.
    """

    time: str | None
    worker: str | None
    id: str
    op: str
    message: str
    kind: str = ""
    pattern: str = ""
    stage: str | None = None

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind, self.pattern = error_kind(self.error, self.id)

    @property
    def error(self) -> str:
        """The row's ``error`` column as the manifest has it: ``op: message``."""
        return f"{self.op}: {self.message}" if self.message else self.op


# -- writing ---------------------------------------------------------------------------------------
def origin(doc: Mapping[str, Any] | None) -> dict[str, str | None]:
    """When and where a partition's rows were made, for errors.log: a marker's ``finished`` and
    ``worker``, or a failure record's ``time`` (its worker unknown)."""
    doc = doc or {}
    return {"time": doc.get("finished") or doc.get("time"), "worker": doc.get("worker")}


def _field(value: Any) -> str:
    text = UNKNOWN if value is None or value == "" else str(value)
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def log_lines(table: pa.Table, info: Mapping[str, Any] | None = None) -> str:
    """errors.log's lines for the failed rows of ``table`` (its ``id`` and ``error`` columns).

    ``info`` holds ``time`` and ``worker`` for every row (see :func:`origin`), and may hold ``by_id``:
    ``{id: (time, worker)}`` for rows that each have their own (the last stage's log, republished).
    """
    info = info or {}
    by_id: Mapping[str, tuple[str | None, str | None]] = info.get("by_id") or {}
    ids = table.column("id").to_pylist()
    errors = table.column("error").to_pylist()
    lines = []
    for row_id, message in zip(ids, errors):
        if message:
            op, _, text = str(message).partition(": ")
            key = _field(row_id)
            time, worker = by_id.get(key, (info.get("time"), info.get("worker")))
            lines.append("\t".join([_field(time), _field(worker), key, _field(op), _field(text)]) + "\n")
    return "".join(lines)


# -- reading ---------------------------------------------------------------------------------------
def parse_log(lines: Iterable[str]) -> Iterator[Failure]:
    """The failures in errors.log's lines: the current format after its header, else the old three
    columns (id, op, message)."""
    old = None
    for line in lines:
        line = line.rstrip("\r\n")
        if old is None:
            old = not line.startswith("#")
        if not line or line.startswith("#"):
            continue
        if old:
            row_id, op, message = (line.split("\t", 2) + ["", ""])[:3]
            yield Failure(None, None, row_id, op, message)
        else:
            time, worker, row_id, op, message = (line.split("\t", 4) + [""] * 4)[:5]
            yield Failure(_known(time), _known(worker), row_id, op, message)


def _known(value: str) -> str | None:
    return None if value in ("", UNKNOWN) else value


def iter_failures(store_or_root: Store | str, storage_options: dict[str, Any] | None = None) -> Iterator[Failure]:
    """Every failed row of an output root, streamed.

    A finished root (or a stage of one) reads its ``errors.log``; a run still going, or killed, has none
    yet (or an earlier run's), so its finished partitions' rows are read instead, with their markers' time
    and worker. A pipeline with reshape steps reads its top-level errors.log once published, else each
    stage's failures (``stage`` says which).
    """
    from daskmv.store import RUN_JSON, Store

    store = store_or_root if isinstance(store_or_root, Store) else Store(store_or_root, storage_options)
    run = store.read_json(RUN_JSON) or {}
    if run.get("state") in ("complete", "incomplete") or not run:
        yield from read_log(store)
    elif run.get("staged"):
        for record in run.get("stages", []):
            stage = Store(store.url(record["folder"]), store.storage_options)
            if stage.exists(RUN_JSON):
                for failure in iter_failures(stage):
                    failure.stage = failure.stage or f"{record['index']} {record['name']}"
                    yield failure
    else:
        yield from _from_parts(store, run)


def read_log(store: Store) -> Iterator[Failure]:
    """The failures in a root's errors.log as it stands (none when there is none)."""
    from daskmv.store import ERRORS_LOG

    try:
        fh = store.open(ERRORS_LOG, "rb")
    except FileNotFoundError:
        return
    with io.TextIOWrapper(fh, encoding="utf-8", errors="replace", newline="\n") as text:  # closes fh too
        yield from parse_log(text)


def read_failures(store_or_root: Store | str, storage_options: dict[str, Any] | None = None) -> list[Failure]:
    """Every failed row of an output root (see :func:`iter_failures`)."""
    return list(iter_failures(store_or_root, storage_options))


def _from_parts(store: Store, run: dict[str, Any]) -> Iterator[Failure]:
    """The failed rows of a run that has not written errors.log: its finished partitions' and given-up ones'."""
    from daskmv.store import counts_for

    done = {i: m for i, m in store.markers().items() if counts_for(run, m)}
    sources = [(i, m.part, origin(m.info)) for i, m in done.items() if m.errors]
    sources += [(i, doc.get("part"), origin(doc)) for i, doc in store.failures().items()
                if i not in done and i < int(run.get("partitions") or 0)]
    for _, part, info in sorted(sources, key=lambda s: s[0]):
        if part:
            table = store.read_part_file(part).select(["id", "error"])
            yield from parse_log([HEADER, *log_lines(table, info).splitlines()])


def failed_attempts(store: Store) -> list[dict[str, Any]]:
    """The partition attempts that failed (run.json ``failed_attempts``; a staged root's, per stage)."""
    from daskmv.store import RUN_JSON, Store

    run = store.read_json(RUN_JSON) or {}
    if not run.get("staged"):
        return list(run.get("failed_attempts") or [])
    found = []
    for record in run.get("stages", []):
        stage = Store(store.url(record["folder"]), store.storage_options)
        for attempt in (stage.read_json(RUN_JSON) or {}).get("failed_attempts") or []:
            found.append({**attempt, "stage": f"{record['index']} {record['name']}"})
    return found


# -- grouping --------------------------------------------------------------------------------------
def group_failures(failures: Iterable[Failure], attempts: Iterable[Mapping[str, Any]] = (),
                   examples: int = 3) -> list[dict[str, Any]]:
    """Failures grouped by kind and normalised message (the report's groups), then failed partition
    attempts grouped as ``partition: <ExceptionType>``; most frequent first.

    Each group: ``kind``, ``count``, a representative ``message``, ``first`` and ``last`` time, the
    ``workers`` involved, up to ``examples`` example ``ids`` (partition attempts: ``p000012 #2``) and
    ``level`` (``row`` or ``partition``).
    """
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(level: str, kind: str, pattern: str, message: str, time: str | None, workers: Iterable[str],
            example: str) -> None:
        group = groups.get((level, kind, pattern))
        if group is None:
            group = groups[(level, kind, pattern)] = {"kind": kind, "count": 0, "message": message, "first": None,
                                                      "last": None, "workers": set(), "ids": [], "level": level}
        group["count"] += 1
        if time:
            if group["first"] is None or _instant(time) < _instant(group["first"]):
                group["first"] = time
            if group["last"] is None or _instant(time) > _instant(group["last"]):
                group["last"] = time
        group["workers"].update(workers)
        if len(group["ids"]) < examples:
            group["ids"].append(example)

    for f in failures:
        add("row", f.kind, f.pattern, f.error, f.time, [f.worker] if f.worker else [], f.id)
    for a in attempts:
        error = str(a.get("error") or "")
        kind, pattern = error_kind(f"partition: {error}")
        if kind == "partition":  # no exception type to name (a cancelled task)
            kind = f"partition: {error.split(':', 1)[0][:40]}" if error else kind
        where = f"p{int(a.get('index', 0)):06d} #{a.get('attempt', '?')}"
        if a.get("stage"):
            where = f"stage {a['stage'].split(' ', 1)[0]} {where}"
        add("partition", kind, pattern, error, a.get("time"), _ADDRESS.findall(error), where)
    out = sorted(groups.values(), key=lambda g: (-g["count"], g["level"] != "row", g["kind"], g["message"]))
    for group in out:
        group["workers"] = sorted(group["workers"])
    return out


def _instant(stamp: str) -> Any:
    """A time stamp, comparable (ISO strings of different zones compare as instants)."""
    try:
        parsed = dt.datetime.fromisoformat(stamp)
    except ValueError:
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
