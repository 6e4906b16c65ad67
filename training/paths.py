"""Where the repository's own files are: paths a user gives relative to it (``ds_configs/...``)
resolve here, whatever the working directory.

    resolve_repo_path("ds_configs/zero2.json")   # <repo>/ds_configs/zero2.json unless ./ds_configs exists
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_repo_path(path: str) -> Path:
    """A path as given if it exists, else relative to the repository (``ds_configs/zero2.json``)."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given
    return REPO_ROOT / given
