"""Durable replacement of files and directories: write beside, fsync, rename, fsync the folder."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a directory and everything under it: every file, then every directory's entry list, the
    deepest first and `path` last (so a rename of it publishes only whole files, each under its name)."""
    p = Path(path)
    if p.is_dir():
        under = list(p.rglob("*"))
        files = [f for f in under if f.is_file() and not f.is_symlink()]
        dirs = sorted((d for d in under if d.is_dir() and not d.is_symlink()), key=lambda d: len(d.parts),
                      reverse=True)
        paths = [*files, *dirs, p]
    else:
        paths = [p]
    for f in paths:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory's entry list (makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename `tmp` (a file written beside `final`) over `final` after making its content durable: readers see
    the old file or the new one, never a part; after a crash, one of the two is there whole."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)
