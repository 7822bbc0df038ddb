"""`webdataset`: existing WebDataset tars, read as a stream of members.

Consecutive members with one key (`webdataset`'s `base_plus_ext` split of the name) form a
sample. Every image member (an extension in `image_keys`) is its own row, so nothing good is
dropped: two images under one key are two rows, a key that comes back later in the tar is
read again, and a member name that appears twice gets `@2` in its uri. What cannot be used is
a row with its reason: a sample without an image (`not_an_image`), a member that is a link or
device (`not_a_file`), one larger than `ingest.max_bytes` (`too_large`), and a tar that
breaks part way (`bad_tar`: the members before the break are kept, the message names where
it broke). A record's `uri` is `<tar path under the pattern's folder>#<member name>`.

The loop is written here rather than taken from `webdataset.tariterators.tar_file_iterator`
because that iterator reads every member whole before anyone can look at its size, and
skips links without a word.
"""

from __future__ import annotations

import glob
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.records import Record
from pipeline.sources.base import Context, Failure, Reader, extensions_ok, nonempty
from pipeline.sources.files import relative_uri

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif")
def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """webdataset's split of a member name into key and extension, imported when first used:
    `import webdataset` pulls in torch (0.7 s), which every other command can do without."""
    from webdataset.tariterators import base_plus_ext as split

    return split(name)


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members, skipped as it does
_MAGIC = "*?[{"


@dataclass(frozen=True)
class WebDatasetOptions:
    path: str  # a tar, a glob (`/data/*.tar`) or a brace pattern (`/data/shard-{000..009}.tar`)
    image_keys: tuple[str, ...] = IMAGE_KEYS
    caption_key: str | None = None
    generator: str | None = None

    def __post_init__(self) -> None:
        nonempty("path", self.path)
        nonempty("caption_key", self.caption_key)
        nonempty("generator", self.generator)
        extensions_ok("image_keys", self.image_keys)


@dataclass(frozen=True)
class TarEntry:
    uri: str
    path: str


def pattern_root(pattern: str) -> Path:
    """The folder a pattern's tars are named relative to: up to its first wildcard."""
    cut = min((pattern.index(c) for c in _MAGIC if c in pattern), default=len(pattern))
    return Path(pattern[:cut]).parent if cut < len(pattern) else Path(pattern).parent


class WebDataset(Reader):
    kind = "webdataset"
    Options = WebDatasetOptions

    def units(self, batch: int) -> Iterator[list[TarEntry | Failure]]:
        pattern = str(self.source.path())
        root = pattern_root(pattern)
        if any(c in pattern for c in "*?["):
            tars = sorted(glob.glob(pattern))
        else:
            import braceexpand

            tars = list(braceexpand.braceexpand(pattern))
        if not tars:
            yield [Failure(".", "missing_path", f"no tar matches {pattern}", local_path=pattern)]
            return
        for t in tars:
            uri = relative_uri(t, root)
            if not Path(t).exists():
                yield [Failure(uri, "missing_file", f"{uri}: no such tar", local_path=t)]
            else:
                yield [TarEntry(uri, t)]

    def read(self, entry: TarEntry, ctx: Context) -> Iterator[Record]:
        from pipeline.ingest import IngestError

        names: Counter[str] = Counter()  # member name -> times seen
        samples: Counter[str] = Counter()  # sample key -> times seen
        group: list[tuple[str, str, str, bytes]] = []  # (key, member name, uri, bytes)
        count, last = 0, None
        try:
            with ctx.open_stream(entry.path) as f, tarfile.open(fileobj=f, mode="r|*") as stream:
                for info in stream:
                    name = info.name
                    if info.isdir() or _META.match(name):
                        continue
                    count, last = count + 1, name
                    names[name] += 1
                    uri = self._uri(entry, name, names[name])
                    if not info.isreg():
                        yield self._error(ctx, entry, uri, "not_a_file",
                                          f"{uri}: tar member is a link or device, not read")
                        continue
                    if info.size > ctx.max_bytes:
                        yield self._error(ctx, entry, uri, "too_large",
                                          f"{uri}: {info.size} bytes > ingest.max_bytes={ctx.max_bytes}")
                        continue
                    key, _ = base_plus_ext(name)
                    if key is None:
                        yield self._error(ctx, entry, uri, "not_an_image",
                                          f"{uri}: member name has no extension; not part of a sample")
                        continue
                    data = stream.extractfile(info).read()
                    if group and group[0][0] != key:
                        yield from self._sample(ctx, entry, group, samples)
                        group = []
                    group.append((key, name, uri, data))
        except IngestError as e:
            yield ctx.error(self.source, entry.uri, e.reason, str(e), local_path=entry.path)
            return
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
            yield from self._sample(ctx, entry, group, samples)
            where = f"after member {count} ({last})" if last else "at its start"
            yield ctx.error(self.source, entry.uri, "bad_tar",
                            f"{entry.uri}: tar unreadable {where}: {e}; members after that point were not read",
                            item_id=f"{entry.uri}#bad_tar", local_path=entry.path)
            return
        yield from self._sample(ctx, entry, group, samples)

    def _uri(self, entry: TarEntry, name: str, n: int) -> str:
        return f"{entry.uri}#{name}" + (f"@{n}" if n > 1 else "")

    def _error(self, ctx: Context, entry: TarEntry, uri: str, reason: str, message: str) -> Record:
        return ctx.error(self.source, uri, reason, message,
                         local_path=f"{entry.path}#{uri.split('#', 1)[1]}")

    def _sample(self, ctx: Context, entry: TarEntry, group: list[tuple[str, str, str, bytes]],
                samples: Counter[str]) -> Iterator[Record]:
        """The rows of one sample (consecutive members with one key): one per image member."""
        if not group:
            return
        keys = {k.lower().lstrip(".") for k in self.options.image_keys}
        ck = (self.options.caption_key or "").lower()
        key = group[0][0]
        samples[key] += 1
        ext = {name: base_plus_ext(name)[1].lower() for _, name, _, _ in group}
        caption = next((d.decode("utf-8", "replace") for _, n, _, d in group if ck and ext[n] == ck), None)
        images = [(uri, data) for _, name, uri, data in group if ext[name] in keys]
        if not images:
            uri = f"{entry.uri}#{key}"
            yield ctx.error(self.source, uri, "not_an_image",
                            f"{uri}: sample has no image member (members: {', '.join(ext.values())}; "
                            f"image_keys: {', '.join(sorted(keys))})",
                            item_id=f"{uri}#noimage@{samples[key]}", local_path=f"{entry.path}#{key}")
            return
        for uri, data in images:
            yield ctx.item(self.source, uri, data, caption=caption,
                           local_path=f"{entry.path}#{uri.split('#', 1)[1]}")
