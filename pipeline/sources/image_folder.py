"""`image_folder`: a folder tree of images (reals, or fakes of one `generator`).

Every file under `path` whose extension passes `extensions` (all files by default) is one
item; its `uri` is its path inside the folder. See `pipeline.sources.files` for links,
FIFOs, devices and unreadable folders.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.executor import chunked
from pipeline.records import Record
from pipeline.sources.base import Context, Failure, Reader, extensions_ok, nonempty
from pipeline.sources.files import FileEntry, walk


@dataclass(frozen=True)
class ImageFolderOptions:
    path: str
    recursive: bool = True
    extensions: tuple[str, ...] | None = None  # e.g. [jpg, png]; null: every file
    generator: str | None = None  # for fakes: what made them
    follow_external_links: bool = False  # read symlinks that leave the folder

    def __post_init__(self) -> None:
        nonempty("path", self.path)
        nonempty("generator", self.generator)
        extensions_ok("extensions", self.extensions)


class ImageFolder(Reader):
    kind = "image_folder"
    Options = ImageFolderOptions

    def units(self, batch: int) -> Iterator[list[FileEntry | Failure]]:
        o = self.options
        entries = walk(self.source.path(), recursive=o.recursive, extensions=o.extensions,
                       follow_external_links=o.follow_external_links)
        yield from chunked(entries, batch)

    def read(self, entry: FileEntry, ctx: Context) -> Iterator[Record]:
        yield ctx.file(self.source, entry.uri, entry.path)
