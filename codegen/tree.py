"""A generated output tree: replaced wholesale, and compared with what would be generated.

Every generator (stubs, manifests) owns one directory of the repository and commits its
output; these two operations are the same for all of them.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

# Bytecode caches appear under generated Python packages once they are imported.
_IGNORED_DIRS = frozenset({"__pycache__"})
_IGNORED_SUFFIXES = frozenset({".pyc"})


def replace(repo_root: Path, output_root: PurePosixPath, rendered: Mapping[str, bytes]) -> None:
    """Replace the output tree with ``rendered`` (path -> content), dropping stale files."""
    output = repo_root / output_root
    if output.exists():
        shutil.rmtree(output)
    for path, content in rendered.items():
        target = repo_root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def compare(
    repo_root: Path,
    output_root: PurePosixPath,
    expected: Mapping[str, bytes],
    *,
    regenerate: str,
    extra: str,
) -> list[str]:
    """One line per file that is stale, missing or extra (``extra`` says why); empty when fresh."""
    actual = files_under(repo_root, output_root)
    problems: list[str] = []
    for path in sorted(expected.keys() | actual):
        if path not in actual:
            problems.append(f"{path}: missing; run `{regenerate}`")
        elif path not in expected:
            problems.append(f"{path}: {extra}; run `{regenerate}`")
        elif (repo_root / path).read_bytes() != expected[path]:
            problems.append(f"{path}: stale; run `{regenerate}`")
    return problems


def files_under(repo_root: Path, root: PurePosixPath) -> set[str]:
    """The files of an output tree, as repository-relative POSIX paths."""
    base = repo_root / root
    if not base.is_dir():
        return set()
    return {
        path.relative_to(repo_root).as_posix()
        for path in base.rglob("*")
        if path.is_file()
        and path.suffix not in _IGNORED_SUFFIXES
        and not _IGNORED_DIRS.intersection(path.relative_to(base).parts)
    }
