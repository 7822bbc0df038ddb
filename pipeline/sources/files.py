"""Listing untrusted folders: what the folder kinds (image_folder, blocklist, forensic) share.

Only names are listed here; the bytes are read later by `Context.read_file`, which reads
regular files only, up to `ingest.max_bytes`. While listing:

- hidden names (starting with a dot) are skipped, as file browsers do;
- a symbolic link whose target lies outside the source folder is not followed and becomes
  an `external_link` row, unless the source sets `follow_external_links: true`;
- a link to a folder inside the source is not followed (its files are listed once, from
  the real folder) and is a `linked_directory` row; a link cycle is a `link_loop` row;
- a folder that cannot be listed is an `unreadable_dir` row, and the rest goes on;
- FIFOs, devices and sockets are listed like files (if their name passes the extension
  filter) so that reading them gives a `not_a_file` row instead of a hang.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pipeline.sources.base import Failure


@dataclass(frozen=True)
class FileEntry:
    uri: str  # relative to the source root, '/'-separated
    path: str  # full local path


def _sort_key(e: FileEntry | Failure) -> bytes:
    return e.uri.encode("utf-8", "surrogateescape")


def is_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def relative_uri(path: str | Path, root: str | Path) -> str:
    """`path` relative to `root` ('/'-separated) when it lies inside, else its file name
    alone: a uri never names folders outside the source."""
    p, r = os.path.abspath(path), os.path.abspath(root)
    if is_inside(p, r):
        rel = os.path.relpath(p, r)
        return "." if rel == "." else rel.replace(os.sep, "/")
    return os.path.basename(p)


def root_problem(root: Path) -> Failure | None:
    """A row for a source folder that is missing or not a folder, else None."""
    if not root.exists():
        kind = "dangling link" if root.is_symlink() else "does not exist"
        return Failure(".", "missing_path", f"source folder {kind}: {root}", local_path=str(root))
    if not root.is_dir():
        return Failure(".", "not_a_directory", f"source path is not a folder: {root}",
                       local_path=str(root))
    return None


def walk(
    root: Path,
    *,
    recursive: bool = True,
    extensions: tuple[str, ...] | None = None,
    follow_external_links: bool = False,
) -> list[FileEntry | Failure]:
    """Files under `root` (see the module doc), sorted by uri; problems are `Failure`s."""
    problem = root_problem(root)
    if problem:
        return [problem]
    exts = {e.lower().lstrip(".") for e in extensions} if extensions else None
    root_real = os.path.realpath(root)
    visited = {root_real}
    out: list[FileEntry | Failure] = []
    stack: list[tuple[str, str]] = [(str(root), "")]

    def wanted(name: str) -> bool:
        return exts is None or Path(name).suffix.lower().lstrip(".") in exts

    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name.encode("utf-8", "surrogateescape"))
        except OSError as e:
            out.append(Failure(rel or ".", "unreadable_dir",
                               f"{rel or '.'}: cannot list folder: {e.strerror or e}",
                               local_path=folder))
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            uri = f"{rel}/{name}" if rel else name
            path = os.path.join(folder, name)
            if entry.is_symlink():
                try:
                    st = os.stat(path)
                except OSError:  # dangling or a loop: reading it says which
                    if wanted(name):
                        out.append(FileEntry(uri, path))
                    continue
                target = os.path.realpath(path)
                inside = is_inside(target, root_real)
                is_dir = stat.S_ISDIR(st.st_mode)
                if is_dir and not recursive or not is_dir and not wanted(name):
                    continue
                if not inside and not follow_external_links:
                    out.append(Failure(
                        uri, "external_link",
                        f"{uri}: symbolic link to a path outside the source folder, not followed "
                        "(set follow_external_links: true on the source to read it)",
                        local_path=path))
                elif is_dir and inside:
                    out.append(Failure(
                        uri, "linked_directory",
                        f"{uri}: link to a folder inside the source, not followed (its files are "
                        "listed once, from the real folder)", local_path=path))
                elif is_dir:
                    if target in visited:
                        out.append(Failure(uri, "link_loop", f"{uri}: folder link cycle, not followed",
                                           local_path=path))
                    else:
                        visited.add(target)
                        stack.append((path, uri))
                else:
                    out.append(FileEntry(uri, path))
            elif entry.is_dir(follow_symlinks=False):
                if recursive:
                    stack.append((path, uri))
            elif wanted(name):
                out.append(FileEntry(uri, path))
    out.sort(key=_sort_key)
    return out
