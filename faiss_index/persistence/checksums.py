"""Checking an index folder's files against its manifest: the manifest's own sum, every file's sum, no extras."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import IndexFormatError
from ..fileio import sha256_file
from .layout import MANIFEST, MANIFEST_SUM, files_under

LOG = logging.getLogger(__name__)

__all__ = ["check_manifest_sum", "file_statuses", "verify_files"]


def check_manifest_sum(folder: Path) -> str:
    """'ok', or 'unchecked' for a folder written before manifest.sha256 existed; raises if it differs."""
    sum_path = folder / MANIFEST_SUM
    if not sum_path.is_file():
        LOG.warning("%s has no %s (written by an older nil): the manifest itself is not checksummed",
                    folder, MANIFEST_SUM)
        return "unchecked"
    try:
        expected = sum_path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        expected = ""
    if sha256_file(folder / MANIFEST) != expected:
        raise IndexFormatError(f"{folder / MANIFEST} is corrupt (it does not match {MANIFEST_SUM}).")
    return "ok"


def file_statuses(folder: Path, manifest: dict) -> list[tuple[str, str]]:
    """(path, status) for every listed file (ok, missing, corrupt) and every unlisted one (unlisted)."""
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise IndexFormatError(f"{folder / MANIFEST} lists no files.")
    out = []
    for rel, digest in sorted(files.items()):
        p = folder / rel
        if ".." in Path(rel).parts or not p.is_file():
            out.append((rel, "missing"))
        else:
            out.append((rel, "ok" if sha256_file(p) == digest else "corrupt"))
    # An extra file can change what zarr or faiss read (e.g. a chunk zarr skipped as all-fill).
    for rel in files_under(folder):
        if rel not in files and rel not in (MANIFEST, MANIFEST_SUM):
            out.append((rel, "unlisted"))
    return out


def verify_files(folder: Path, manifest: dict) -> None:
    """Raise IndexFormatError for the first missing, corrupt or unlisted file."""
    for rel, status in file_statuses(folder, manifest):
        if status == "missing":
            raise IndexFormatError(f"index file {rel} listed in the manifest is missing from {folder}.")
        if status == "corrupt":
            raise IndexFormatError(f"index file {rel} in {folder} is corrupt (checksum mismatch).")
        if status == "unlisted":
            raise IndexFormatError(f"{folder} holds {rel}, which its manifest does not list; "
                                   "the folder was altered after it was written.")
