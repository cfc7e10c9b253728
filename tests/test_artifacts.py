"""The artifact store and cache keys: content addressing, atomic publish, no leftovers, code version."""

from __future__ import annotations

import json

import pytest

from tasks import caching
from tasks.artifacts import MANIFEST, ArtifactError, ArtifactRef, ArtifactStore, folder_sha256


def _write(folder, files: dict[str, bytes]):
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def test_folder_hash_covers_names_and_bytes(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for folder in (a, b, c):
        folder.mkdir()
    _write(a, {"x.txt": b"1", "sub/y.txt": b"2"})
    _write(b, {"sub/y.txt": b"2", "x.txt": b"1"})  # same content, other creation order
    _write(c, {"x.txt": b"1", "sub/z.txt": b"2"})  # same bytes, other name
    assert folder_sha256(a) == folder_sha256(b)
    assert folder_sha256(a) != folder_sha256(c)
    (a / MANIFEST).write_text("{}")  # the manifest is not content
    assert folder_sha256(a) == folder_sha256(b)


def test_publish_is_content_addressed_and_idempotent(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with store.staging("pairs") as folder:
        _write(folder, {"table.parquet": b"rows"})
        ref = store.publish("pairs", folder, "table", contract="unlabeled_pairs", rows=3, meta={"k": 1})
    assert ref.uri == str(tmp_path / "store" / "pairs" / ref.sha256[:16])
    assert (tmp_path / "store" / "pairs" / ref.short / "table.parquet").read_bytes() == b"rows"
    manifest = json.loads((tmp_path / "store" / "pairs" / ref.short / MANIFEST).read_text())
    assert ArtifactRef.from_dict(manifest) == ref
    # Same content again: same reference, nothing duplicated, staging folders gone.
    with store.staging("pairs") as folder:
        _write(folder, {"table.parquet": b"rows"})
        again = store.publish("pairs", folder, "table", contract="unlabeled_pairs", rows=3, meta={"k": 1})
    assert again == ref
    assert sorted(p.name for p in (tmp_path / "store" / "pairs").iterdir()) == [ref.short]
    assert store.list("pairs") == [ref]
    assert store.local_dir(ref) == tmp_path / "store" / "pairs" / ref.short


def test_failed_stage_leaves_no_artifact(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(RuntimeError, match="boom"), store.staging("finetune") as folder:
        _write(folder, {"model.safetensors": b"half"})
        raise RuntimeError("boom")
    assert list((tmp_path / "store" / "finetune").iterdir()) == []
    assert store.list() == []


def test_missing_artifact_names_uri_and_fix(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ghost = ArtifactRef(uri=str(tmp_path / "store" / "x" / ("0" * 16)), sha256="0" * 64, kind="table")
    with pytest.raises(ArtifactError, match="--refresh") as err:
        store.local_dir(ghost)
    assert ghost.uri in str(err.value)


def test_remote_store_through_fsspec(tmp_path):
    # memory:// stands in for any non-local fsspec URI (s3://, gs://, ...): upload, then move into place.
    store = ArtifactStore("memory://gram-test-store", cache_dir=tmp_path / "cache")
    with store.staging("eval") as folder:
        _write(folder, {"report.md": b"# hi", "scores/base.parquet": b"s"})
        ref = store.publish("eval", folder, "report")
    assert ref.uri == f"memory://gram-test-store/eval/{ref.short}"
    assert store.read_text(ref, "report.md") == "# hi"
    local = store.local_dir(ref)
    assert (local / "scores" / "base.parquet").read_bytes() == b"s"
    assert folder_sha256(local) == ref.sha256
    assert [r.sha256 for r in store.list("eval")] == [ref.sha256]
    assert not store.fs.glob("memory://gram-test-store/eval/.tmp-*")


def test_code_version_tracks_library_source(tmp_path, monkeypatch):
    caching.code_version.cache_clear()
    before = caching.code_version()
    assert len(before) == 16 and before == caching.code_version()
    fake = tmp_path / "gram_core"
    fake.mkdir()
    (fake / "x.py").write_text("A = 1\n")
    monkeypatch.setattr(caching, "_package_dir", lambda name: fake)
    caching.code_version.cache_clear()
    one = caching.code_version()
    (fake / "x.py").write_text("A = 2\n")
    caching.code_version.cache_clear()
    two = caching.code_version()
    caching.code_version.cache_clear()
    assert one != two and before not in (one, two)


def test_stage_options_bind_results_and_refresh(tmp_path):
    opts = caching.stage_options(tmp_path / "results", refresh=True)
    assert opts["result_storage"] == tmp_path / "results"
    assert opts["refresh_cache"] is True and opts["persist_result"] is True
    names = sorted(type(p).__name__ for p in opts["cache_policy"].policies)
    assert names == ["CodeVersion", "Inputs", "TaskSource"]
