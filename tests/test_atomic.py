"""`sae.atomic.replace_dir`, the one directory replace of the SAE directory, the checkpoint, the inspect site and
the caches under SAE_HOME: the old directory or the new one, never a mix; nothing left behind on an error; a
concurrent cache writer that finishes first wins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sae import atomic


def _tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _old_dir(tmp_path: Path) -> Path:
    old = tmp_path / "d"
    (old / "sub").mkdir(parents=True)
    (old / "a.txt").write_text("old a")
    (old / "sub" / "b.txt").write_text("old b")
    return old


def test_a_new_directory_replaces_the_old_one_whole(tmp_path: Path) -> None:
    target = _old_dir(tmp_path)
    with atomic.replace_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".d.tmp-")
        assert _tree(target) == {"a.txt": "old a", "sub/b.txt": "old b"}  # untouched while the new one is built
        (tmp / "c.txt").write_text("new c")
    assert _tree(target) == {"c.txt": "new c"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary or old folder left

    with atomic.replace_dir(tmp_path / "x" / "fresh") as tmp:  # a missing target (and parent) is made
        (tmp / "f").write_text("1")
    assert _tree(tmp_path / "x" / "fresh") == {"f": "1"}


def test_an_error_leaves_the_old_directory_and_nothing_else(tmp_path: Path) -> None:
    target = _old_dir(tmp_path)
    with pytest.raises(RuntimeError, match="half-way"), atomic.replace_dir(target) as tmp:
        (tmp / "c.txt").write_text("new c")
        raise RuntimeError("half-way")
    assert _tree(target) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_failed_rename_puts_the_old_directory_back(tmp_path: Path, monkeypatch) -> None:
    target = _old_dir(tmp_path)
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".d.tmp-"):
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), atomic.replace_dir(target) as tmp:
        (tmp / "c.txt").write_text("new c")
    assert _tree(target) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_the_new_directory_gets_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        with atomic.replace_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o775  # mkdtemp alone would give 0700


@pytest.mark.parametrize("theirs_finished", [True, False])
def test_a_cache_finished_first_by_another_process_is_kept(tmp_path: Path, theirs_finished: bool) -> None:
    """With `finished`, an existing target is never moved aside: when it appeared during our build (another
    process's rename), theirs is kept if complete, and the rename's error stands otherwise."""
    target = tmp_path / "cache"

    def build() -> None:
        with atomic.replace_dir(target, prefix=".cache-", finished=lambda d: (d / "done").is_file()) as tmp:
            (tmp / "done").write_text("ours")
            target.mkdir()  # another process's directory appears meanwhile
            (target / ("done" if theirs_finished else "partial")).write_text("theirs")

    if theirs_finished:
        build()
        assert _tree(target) == {"done": "theirs"}
    else:
        with pytest.raises(OSError):
            build()
        assert _tree(target) == {"partial": "theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
