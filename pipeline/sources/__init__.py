"""Source kinds: one reader class per kind, one file per kind, in one explicit registry.

To add a kind: write `pipeline/sources/<kind>.py` with a `Reader` subclass (its `Options`
dataclass, `units`, `read`; see `base.py`) and add one line to `READERS`.
"""

from __future__ import annotations

from pipeline.sources.base import Failure, Reader, Source
from pipeline.sources.blocklist import Blocklist
from pipeline.sources.forensic import Forensic
from pipeline.sources.hf_dataset import HfDataset
from pipeline.sources.image_folder import ImageFolder
from pipeline.sources.package_samples import PackageSamples
from pipeline.sources.pairs import Pairs
from pipeline.sources.webdataset import WebDataset

READERS: dict[str, type[Reader]] = {
    "package_samples": PackageSamples,
    "image_folder": ImageFolder,
    "hf_dataset": HfDataset,
    "webdataset": WebDataset,
    "forensic": Forensic,
    "pairs": Pairs,
    "blocklist": Blocklist,
}


def reader_for(source: Source, params=None) -> Reader:
    """The reader of a source's kind (kinds are checked when the manifest loads)."""
    return READERS[source.kind](source, params)


__all__ = ["READERS", "Failure", "Reader", "Source", "reader_for"]
