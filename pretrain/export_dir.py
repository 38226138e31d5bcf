"""The directory an export is written to: which files are ember's, and how a new export replaces an old one.

Every export ends with `ember_export.json`, listing the files it wrote. An export is staged in `OUT.tmp`; a new
target is then one rename. Into an existing directory the staged files are moved one by one (each an atomic
rename), files that only the previous export listed are removed, and nothing else is touched: a file the
directory held that no ember export wrote is never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ember.errors import UserError

MARKER = "ember_export.json"


def export_files(out_dir: Path) -> set[str] | None:
    """Names of the files the ember export in `out_dir` wrote; None when `out_dir` holds no ember export."""
    try:
        listed = json.loads((Path(out_dir) / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(listed, list):
        return None
    # Plain names only: a listing never reaches outside the directory.
    return {n for n in listed if isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n}


def check_export_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty directory that is not an earlier ember export (unless
    `overwrite`: then ember's files are written into it and its other files stay)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("the export target is a file, not a directory", str(out_dir))
    if overwrite or not out_dir.is_dir() or export_files(out_dir) is not None or not any(out_dir.iterdir()):
        return
    raise UserError("the export target is a non-empty directory that holds no earlier ember export; "
                    "pick another directory, or pass --overwrite to write into it (its other files are kept)", str(out_dir))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish_export(staged: Path, out_dir: Path) -> None:
    """Move the complete export in `staged` to `out_dir` (see the module doc); `staged` is gone afterwards."""
    staged, out_dir = Path(staged), Path(out_dir)
    names = sorted(p.name for p in staged.iterdir() if p.name != MARKER)
    (staged / MARKER).write_text(json.dumps({"files": names}, indent=1) + "\n")
    if not out_dir.exists():
        staged.rename(out_dir)
        return
    previous = export_files(out_dir) or set()
    # Checked before anything moves: a directory that no ember export wrote is never replaced.
    blocked = [n for n in names if n not in previous and (out_dir / n).is_dir() and not (out_dir / n).is_symlink()]
    if blocked:
        shutil.rmtree(staged)
        raise UserError(f"the export target holds a directory named {blocked[0]!r}, which the export would replace",
                        str(out_dir))
    for name in names:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # a directory of the previous export: os.replace cannot replace it in one go
        os.replace(staged / name, target)
    for name in previous - set(names):
        _remove(out_dir / name)
    os.replace(staged / MARKER, out_dir / MARKER)  # last: the listing names only files that are in place
    staged.rmdir()
