"""`pairs`: a CSV or JSONL listing of (original, edited) image paths, without masks.

Each listing row gives two records: the original (real) and the edited image (tampered,
`operation` from the source, `edit` by default) whose mask the masks stage derives by
differencing against the original. Paths are absolute or relative to the listing's folder.
A listing that cannot be parsed, lacks the two columns, or has a short or malformed row
(a non-string path, an empty cell) gives a row with its reason; the other rows go on.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.executor import chunked
from pipeline.records import Record
from pipeline.sources.base import Context, Failure, Reader, nonempty
from pipeline.sources.files import relative_uri


@dataclass(frozen=True)
class PairsOptions:
    path: str
    original_column: str = "original"
    edited_column: str = "edited"
    generator: str | None = None
    operation: str = "edit"

    def __post_init__(self) -> None:
        for key in ("path", "original_column", "edited_column", "generator", "operation"):
            nonempty(key, getattr(self, key))
        if self.original_column == self.edited_column:
            raise ValueError("original_column and edited_column must differ")
        if self.operation == "none":
            raise ValueError("operation 'none' is for real images; edited images need an operation")


@dataclass(frozen=True)
class PairEntry:
    uri: str  # <listing>:<row>
    original: str
    edited: str
    original_uri: str
    edited_uri: str


class Pairs(Reader):
    kind = "pairs"
    Options = PairsOptions

    def units(self, batch: int) -> Iterator[list[PairEntry | Failure]]:
        yield from chunked(self._entries(self.source.path()), batch)

    def _rows(self, path: Path) -> list[tuple[int, Any]] | Failure:
        """(line number, row) pairs, or one Failure for a listing that cannot be read."""
        from pipeline.ingest import read_regular

        name = path.name
        try:
            text = read_regular(path, 1 << 30).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            return Failure(name, "bad_listing", f"{name}: not UTF-8 text: {e}", local_path=str(path))
        except Exception as e:  # noqa: BLE001 - missing, not a file, too large: one row
            return Failure(name, getattr(e, "reason", "bad_listing"), f"{name}: {e}", local_path=str(path))
        if path.suffix.lower() in (".jsonl", ".json"):
            stripped = text.lstrip()
            if path.suffix.lower() == ".json" and stripped.startswith("["):
                try:
                    rows = json.loads(text)
                except json.JSONDecodeError as e:
                    return Failure(name, "bad_listing", f"{name}: not valid JSON: {e}", local_path=str(path))
                return list(enumerate(rows, 1))
            out: list[tuple[int, Any]] = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        out.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        out.append((n, Failure(f"{name}:{n}", "bad_entry", f"{name} line {n}: not JSON: {e}")))
            return out
        oc, ec = self.options.original_column, self.options.edited_column
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or oc not in reader.fieldnames or ec not in reader.fieldnames:
            cols = ", ".join(reader.fieldnames or []) or "none"
            return Failure(name, "bad_listing",
                           f"{name}: columns are {cols}; expected {oc!r} and {ec!r} "
                           "(original_column, edited_column)", local_path=str(path))
        try:
            return [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            return Failure(name, "bad_listing", f"{name}: not a valid CSV: {e}", local_path=str(path))

    def _entries(self, path: Path) -> list[PairEntry | Failure]:
        name = path.name
        rows = self._rows(path)
        if isinstance(rows, Failure):
            return [rows]
        oc, ec = self.options.original_column, self.options.edited_column
        folder = path.parent
        out: list[PairEntry | Failure] = []
        for i, (line, row) in enumerate(rows):
            where = f"{name}:{i}"
            if isinstance(row, Failure):
                out.append(Failure(where, row.reason, row.message, item_id=where))
                continue
            bad = None
            if not isinstance(row, dict):
                bad = f"expected a mapping with {oc!r} and {ec!r}, got {json.dumps(row)[:200]}"
            else:
                for col in (oc, ec):
                    v = row.get(col)
                    if not isinstance(v, str) or not v.strip():
                        bad = f"{col!r} must be a non-empty path string, got {v!r}"
                        break
            if bad:
                out.append(Failure(where, "bad_entry", f"{name} line {line}: {bad}", item_id=where))
                continue
            o, e = (Path(row[c]) if Path(row[c]).is_absolute() else folder / row[c] for c in (oc, ec))
            out.append(PairEntry(where, str(o), str(e), relative_uri(o, folder), relative_uri(e, folder)))
        return out

    def read(self, entry: PairEntry, ctx: Context) -> Iterator[Record]:
        recs = []
        for side, label in (("original", "real"), ("edited", "tampered")):
            recs.append(ctx.file(self.source, getattr(entry, f"{side}_uri"), getattr(entry, side),
                                 item_id=f"{entry.uri}#{side}", label=label))
        orig, edited = recs
        edited = edited.replace(parent_key=orig.key, parent_blob=orig.blob, source_id=orig.sha256,
                                operation=self.options.operation, mask_source="derived")
        if edited.status == "ok" and orig.status != "ok":
            edited = edited.replace(status="missing_original", error=f"original unusable: {orig.error}")
        yield orig
        yield edited
