"""The stage cache: stable keys, reuse, atomic publication, a build log."""

import json

import pytest

from salsa.infra.cache import StageCache, stage_key


def test_key_is_stable_and_sensitive():
    spec = {"a": 1, "b": {"c": [1, 2]}}
    assert stage_key("sft", spec) == stage_key("sft", {"b": {"c": [1, 2]}, "a": 1})  # key order does not matter
    assert stage_key("sft", spec) != stage_key("soup", spec)
    assert stage_key("sft", spec) != stage_key("sft", {"a": 2, "b": {"c": [1, 2]}})


def test_build_once_then_reuse(tmp_path):
    cache = StageCache(tmp_path)
    calls = []

    def build(work):
        calls.append(work)
        (work / "weights.txt").write_text("w")
        return {"metrics": {"loss": 1.5}}

    first = cache.get_or_build("sft", {"i": 0}, build)
    second = cache.get_or_build("sft", {"i": 0}, build)
    assert len(calls) == 1 and not first.reused and second.reused
    assert second.path == first.path and (second.path / "weights.txt").read_text() == "w"
    assert second.manifest["metrics"] == {"loss": 1.5} and second.manifest["spec"] == {"i": 0}
    assert [b["key"] for b in cache.builds()] == [first.key]
    assert not (tmp_path / "sft" / f"{first.key}.partial").exists()


def test_failed_build_publishes_nothing(tmp_path):
    cache = StageCache(tmp_path)

    def broken(work):
        (work / "half.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get_or_build("rm", {"x": 1}, broken)
    key = stage_key("rm", {"x": 1})
    assert cache.lookup("rm", key) is None
    assert cache.builds() == []
    # the next attempt starts from the same work dir (where an interrupted build leaves its checkpoints)
    seen = []
    entry = cache.get_or_build("rm", {"x": 1}, lambda work: seen.append(sorted(p.name for p in work.iterdir())))
    assert seen == [["half.txt"]]
    assert json.loads((entry.path / "manifest.json").read_text())["key"] == key


def test_lock_check_sees_another_process_hold_the_lock(tmp_path):
    from salsa.infra.cache import check_locking

    assert "file locks work" in check_locking(tmp_path / "shared")
    assert not list((tmp_path / "shared").glob("*.lock"))  # nothing left behind


def test_lock_check_fails_where_locks_do_not_exclude(tmp_path, monkeypatch):
    """A filesystem whose locks are no-ops (Lustre without -o flock, some NFS setups) is reported, not trusted."""
    import contextlib

    import salsa.infra.cache as cache

    monkeypatch.setattr(cache, "FileLock", lambda *a, **k: contextlib.nullcontext())
    with pytest.raises(RuntimeError, match="do not exclude"):
        cache.check_locking(tmp_path)
