"""`blocklist`: images that must never enter training (public benchmark test sets, say).

Read like an `image_folder`; every readable image is a row with status `blocklist`, never
shipped; dedup and split drop its near-duplicates from train and val.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.records import Record
from pipeline.sources.base import Context, extensions_ok, nonempty
from pipeline.sources.files import FileEntry
from pipeline.sources.image_folder import ImageFolder


@dataclass(frozen=True)
class BlocklistOptions:
    path: str
    recursive: bool = True
    extensions: tuple[str, ...] | None = None
    follow_external_links: bool = False

    def __post_init__(self) -> None:
        nonempty("path", self.path)
        extensions_ok("extensions", self.extensions)


class Blocklist(ImageFolder):
    kind = "blocklist"
    Options = BlocklistOptions

    def read(self, entry: FileEntry, ctx: Context) -> Iterator[Record]:
        rec = ctx.file(self.source, entry.uri, entry.path)
        if rec.status == "ok":
            rec = rec.replace(status="blocklist", error="blocklisted source: never shipped")
        yield rec
