"""Verifying an index folder without trusting any of it: a per-file report, never an exception."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import IndexFormatError, IndexInputError
from .checksums import check_manifest_sum, file_statuses
from .layout import MANIFEST, read_manifest
from .load import load_index

LOG = logging.getLogger(__name__)

__all__ = ["verify_index"]


def verify_index(index_dir: str | Path) -> dict:
    """Check an index folder without trusting any of it; never raises for a bad folder.

    Returns ``{"ok": bool, "files": [{"path", "status"}], "error": str | None}``: status is ok,
    missing, corrupt or unlisted per file (manifest.json: ok, corrupt or unchecked), then, when
    every file is sound, the result of a full :func:`load_index` (shapes, counts, structure).
    """
    folder = Path(index_dir)
    report: dict = {"ok": False, "files": [], "error": None}
    manifest_path = folder / MANIFEST
    try:
        status = check_manifest_sum(folder) if manifest_path.is_file() else "missing"
    except IndexFormatError as e:
        status, report["error"] = "corrupt", str(e)
    report["files"].append({"path": MANIFEST, "status": status})
    if status in ("missing", "corrupt"):
        report["error"] = report["error"] or (f"index folder {folder} does not exist." if not folder.is_dir()
                                              else f"{folder} is not an index folder: {MANIFEST} is missing.")
        return report
    try:
        manifest = read_manifest(folder)
        statuses = file_statuses(folder, manifest)
    except IndexFormatError as e:
        report["error"] = str(e)
        return report
    report["files"] += [{"path": rel, "status": st} for rel, st in statuses]
    bad = [f for f in report["files"] if f["status"] not in ("ok", "unchecked")]
    if bad:
        report["error"] = f"{len(bad)} file(s) of {folder} are {', '.join(sorted({f['status'] for f in bad}))}."
        return report
    try:
        load_index(folder)
    except (IndexFormatError, IndexInputError) as e:
        report["error"] = str(e)
        return report
    report["ok"] = True
    return report
