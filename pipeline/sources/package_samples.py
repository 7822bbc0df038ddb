"""`package_samples`: real photos and scanned pages that ship inside installed packages.

Items are `package:file` names, e.g. `skimage:page.png` (scikit-image's `data/` folder),
`matplotlib:grace_hopper.jpg` (matplotlib's `sample_data/`), `sklearn:china.jpg`
(scikit-learn's `datasets/images/`). Only files on disk are read; nothing is downloaded. The
item name is the record's `uri`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.executor import chunked
from pipeline.records import Record
from pipeline.sources.base import Context, Failure, Reader
from pipeline.sources.files import FileEntry


def _skimage() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _matplotlib() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data"


def _sklearn() -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images"


PACKAGES = {"skimage": _skimage, "matplotlib": _matplotlib, "sklearn": _sklearn}


def package_sample_path(item: str) -> Path:
    """`skimage:page.png` -> the file inside the installed package."""
    pkg, name = item.split(":", 1)
    return PACKAGES[pkg]() / name


@dataclass(frozen=True)
class PackageSamplesOptions:
    items: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError("items must list at least one 'package:file', e.g. 'skimage:page.png'")
        for it in self.items:
            pkg, _, name = it.partition(":")
            if pkg not in PACKAGES or not name or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(
                    f"items: {it!r} is not 'package:file' with package one of "
                    f"{', '.join(PACKAGES)} and a plain file name, e.g. 'skimage:page.png'"
                )


class PackageSamples(Reader):
    kind = "package_samples"
    Options = PackageSamplesOptions

    def units(self, batch: int) -> Iterator[list[FileEntry | Failure]]:
        entries: list[FileEntry | Failure] = []
        for item in self.options.items:
            try:
                entries.append(FileEntry(item, str(package_sample_path(item))))
            except ImportError as e:
                entries.append(Failure(item, "missing_path", f"{item}: package not installed ({e})"))
        yield from chunked(entries, batch)

    def read(self, entry: FileEntry, ctx: Context) -> Iterator[Record]:
        yield ctx.file(self.source, entry.uri, entry.path)
