"""`hf_dataset`: a Hugging Face `datasets` dataset on local disk (`save_to_disk`, parquet
files or an imagefolder tree), read without decoding its images.

A row's `uri` is `<split>#<row index>`. A row whose image cell is empty, not an image, or a
path to a file that is missing or not a regular file is a row with that reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.records import Record
from pipeline.sources.base import Context, Failure, Reader, nonempty


@dataclass(frozen=True)
class HfDatasetOptions:
    path: str
    format: Literal["auto", "save_to_disk", "parquet", "imagefolder"] = "auto"
    image_column: str = "image"
    caption_column: str | None = None
    split: str | None = None  # default: train, else the first split
    generator: str | None = None

    def __post_init__(self) -> None:
        for key in ("path", "image_column", "caption_column", "split", "generator"):
            nonempty(key, getattr(self, key))


@dataclass(frozen=True)
class RowRange:
    start: int
    stop: int

    @property
    def uri(self) -> str:
        return f"#{self.start}-{self.stop}"


class HfDataset(Reader):
    kind = "hf_dataset"
    Options = HfDatasetOptions

    def __init__(self, source, params=None):
        super().__init__(source, params)
        self._ds: Any = None
        self._split = ""

    def _open(self) -> Any:
        if self._ds is None:
            from pipeline import hf

            self._ds, self._split = hf.open_dataset(self.source)
        return self._ds

    def units(self, batch: int) -> Iterator[list[RowRange | Failure]]:
        rows_per_unit = self.params.hf_rows_per_task if self.params else 256
        try:
            n = len(self._open())
        except Exception as e:  # noqa: BLE001 - a dataset that cannot be opened is a row
            yield [Failure(".", "bad_dataset", f"cannot open dataset: {e}",
                           local_path=str(self.source.path()))]
            return
        for i in range(0, n, rows_per_unit):
            yield [RowRange(i, min(i + rows_per_unit, n))]

    def read(self, entry: RowRange, ctx: Context) -> Iterator[Record]:
        from pipeline import hf
        from pipeline.ingest import IngestError

        ds = self._open()
        col, cap = self.options.image_column, self.options.caption_column
        base = self.source.path()
        for i, row in enumerate(ds.select(range(entry.start, entry.stop)), entry.start):
            uri = f"{self._split}#{i}"
            local = f"{base}#{self._split}#{i}"
            try:
                data = hf.image_bytes(row.get(col), base, ctx.read_file)
            except IngestError as e:
                yield ctx.error(self.source, uri, e.reason, f"row {i}: {e}", local_path=local)
                continue
            if data is None:
                yield ctx.error(self.source, uri, "not_an_image",
                                f"row {i}: no image in column {col!r} (got {type(row.get(col)).__name__})",
                                local_path=local)
                continue
            caption = row.get(cap) if cap else None
            yield ctx.item(self.source, uri, data, caption=None if caption is None else str(caption),
                           local_path=local)
