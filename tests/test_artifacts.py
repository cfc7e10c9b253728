"""The artifact store and cache keys: content addressing, atomic publish, no leftovers, code version."""

from __future__ import annotations

import json

import pytest

from tasks.store import caching
from tasks.store.artifacts import MANIFEST, ArtifactError, ArtifactRef, ArtifactStore, folder_sha256


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


# --------------------------------------------------------------------------------------------------
# Sources: the first boundary (tasks/sources.py)
# --------------------------------------------------------------------------------------------------


def test_source_fills_ids_and_source_for_plain_user_files(tmp_path):
    from gram_core.sources import SourceConfig, read_source

    path = tmp_path / "labels.csv"
    path.write_text('prompt,chosen,rejected\n"Hi, there",hello,go away\nWhat is 2+2?,4,5\n')
    table = read_source(SourceConfig(path=str(path)), "preference_pairs")
    assert table["pair_id"].to_pylist() == ["labels-000000", "labels-000001"]
    assert table["source"].to_pylist() == ["labels", "labels"] and table["prompt"][0].as_py() == "Hi, there"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "a"}\n')
    table = read_source(SourceConfig(path=str(prompts)), "prompts")
    assert table["prompt"].to_pylist() == ["a", "b"]  # a repeated prompt is one prompt
    assert len(set(table["prompt_id"].to_pylist())) == 2


def test_source_errors_name_file_column_and_row(tmp_path):
    from data_contracts import ContractError
    from gram_core.sources import SourceConfig, read_source

    path = tmp_path / "bad.jsonl"
    path.write_text('{"pair_id": "1", "prompt": "p", "chosen": "x", "rejected": "y", "source": "s"}\n'
                    '{"pair_id": "2", "prompt": "p", "chosen": "", "rejected": "y", "source": "s"}\n')
    with pytest.raises(ContractError, match=r"(?s)bad.jsonl.*column 'chosen'.*rows \[1\]"):
        read_source(SourceConfig(path=str(path)), "preference_pairs")
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_source(SourceConfig(path=str(tmp_path / "missing.parquet")), "preference_pairs")


def test_conversations_become_prompt_and_responses():
    import pyarrow as pa

    from data_contracts import PREFERENCE_PAIRS
    from gram_core.conversations import flatten_conversations

    chosen = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
              [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
               {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]]
    rejected = [c[:-1] + [{"role": "assistant", "content": "Go away."}] for c in chosen]
    table = flatten_conversations(pa.table({"chosen": chosen, "rejected": rejected}), PREFERENCE_PAIRS, {}, "t")
    assert table["chosen"].to_pylist() == ["Hello!", "6"] and table["rejected"].to_pylist() == ["Go away."] * 2
    assert table["prompt"].to_pylist() == ["Hi", "User: 2+2?\n\nAssistant: 4\n\nUser: and 3+3?"]
    broken = pa.table({"chosen": [[{"role": "user", "content": "Hi"}]], "rejected": [[{"role": "user", "content": "x"}]]})
    with pytest.raises(ValueError, match=r"column 'chosen': not a well-formed conversation in 1 row\(s\); "
                                         r"rows \[0\], values the last message has role 'user'"):
        flatten_conversations(broken, PREFERENCE_PAIRS, {}, "t")
    none_content = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]]
    with pytest.raises(ValueError, match=r"column 'chosen'.*rows \[1\], values message 1 has content None"):
        flatten_conversations(pa.table({"chosen": chosen[:1] + none_content, "rejected": rejected}),
                              PREFERENCE_PAIRS, {}, "t")


def test_limit_rows_is_seeded_ordered_and_stratified():
    import pyarrow as pa

    from gram_core.sources import limit_rows

    table = pa.table({"id": list(range(100)), "subset": ["a"] * 70 + ["b"] * 25 + ["c"] * 5})
    one = limit_rows(table, 20, seed=3, stratify="subset")
    assert one.equals(limit_rows(table, 20, seed=3, stratify="subset"))
    assert one["id"].to_pylist() == sorted(one["id"].to_pylist())  # original order kept
    counts = {s: one["subset"].to_pylist().count(s) for s in "abc"}
    assert counts == {"a": 14, "b": 5, "c": 1} and sum(counts.values()) == 20
    assert limit_rows(table, 20, seed=4)["id"].to_pylist() != limit_rows(table, 20, seed=3)["id"].to_pylist()
    assert limit_rows(table, 0, seed=0).num_rows == 100 and limit_rows(table, 500, seed=0).num_rows == 100


def test_source_fingerprint_follows_file_changes(tmp_path):
    import os

    from gram_core.sources import SourceConfig
    from tasks.sources import source_fingerprint

    path = tmp_path / "data.jsonl"
    path.write_text("{}\n")
    source = SourceConfig(path=str(path))
    first = source_fingerprint(source)
    assert first == source_fingerprint(source)
    path.write_text("{}\n{}\n")
    os.utime(path, ns=(1, 1))
    assert source_fingerprint(source) != first
    assert source_fingerprint(SourceConfig(path="starter")) is None
    assert source_fingerprint(SourceConfig(hub="org/set")) is None


def test_hub_source_offline_says_what_to_do(monkeypatch):
    from data_contracts import DatasetNotCachedError
    from gram_core.sources import SourceConfig, read_source

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetNotCachedError, match=r"gram-test/no-such-set.*local file"):
        read_source(SourceConfig(hub="gram-test/no-such-set", split="train"), "rewardbench")


def test_publish_fsyncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    """Durability: after a crash a published artifact holds what was written. Every file, its folders and the
    staging folder are fsynced before the rename, the parent folder after it."""
    import os

    from gram_core import folders

    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(folders.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                         real_fsync(fd))[1])
    monkeypatch.setattr(folders.os, "rename", lambda a, b: (events.append(("rename", str(a))), real_rename(a, b))[1])
    store = ArtifactStore(tmp_path / "store")
    with store.staging("eval") as folder:
        (folder / "sub").mkdir()
        (folder / "sub" / "a.bin").write_bytes(b"a")
        (folder / "b.txt").write_text("b")
        ref = store.publish("eval", folder, "report")
    renamed = next(i for i, e in enumerate(events) if e[0] == "rename")
    before = {p for kind, p in events[:renamed] if kind == "fsync"}
    staged = events[renamed][1]
    for rel in ("sub/a.bin", "b.txt", "_artifact.json", "sub", ""):
        assert os.path.normpath(os.path.join(staged, rel)) in before, rel
    assert ("fsync", os.path.dirname(ref.uri)) in events[renamed:]


def _fsync_log(monkeypatch):
    """Every fsync and rename/replace in gram_core.folders, in order: (kind, path)."""
    import os

    from gram_core import folders

    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace
    monkeypatch.setattr(folders.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                         real_fsync(fd))[1])
    monkeypatch.setattr(folders.os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b))[1])
    monkeypatch.setattr(folders.os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b))[1])
    return events


@pytest.mark.parametrize("existing", [False, True])
def test_write_folder_and_write_json_fsync_the_parent_after_the_rename(tmp_path, monkeypatch, existing):
    """The rename that makes a folder (a replaced one too) or a JSON record visible is itself durable: the
    parent folder is fsynced after the last rename into it."""
    import os

    from gram_core.folders import write_folder, write_json

    target = tmp_path / "parent" / "model"
    if existing:
        target.mkdir(parents=True)
        (target / "old.bin").write_bytes(b"old")
    events = _fsync_log(monkeypatch)
    write_folder(target, lambda folder: (folder / "w.bin").write_bytes(b"new"))
    (tmp_path / "records").mkdir()
    write_json(tmp_path / "records" / "record.json", {"a": 1})
    for parent, name in (("parent", "model"), ("records", "record.json")):
        last = max(i for i, e in enumerate(events) if e == ("rename", str(tmp_path / parent / name)))
        assert ("fsync", os.fspath(tmp_path / parent)) in events[last + 1:], f"parent not fsynced after {name}"
    assert (target / "w.bin").read_bytes() == b"new" and not (target / "old.bin").exists()


def test_wall_clock_timings_stay_out_of_the_content_hash_and_back_in_the_history(tmp_path):
    """Two identical trainings differ only in tokens/s: their model artifacts hash the same (so `--refresh`
    finds the registered version by content), and the MLflow history still carries tokens/s."""
    from tasks.store.artifacts import (
        TIMINGS_FILE,
        TRAIN_HISTORY_FILE,
        folder_sha256,
        read_history,
        write_train_history,
    )

    hashes = []
    for speed in (6021.9, 1367.6):
        folder = tmp_path / str(speed)
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"same weights")
        write_train_history(folder, [{"step": 1, "train/loss": 0.69, "train/tokens_per_s": speed}])
        assert "tokens_per_s" not in (folder / TRAIN_HISTORY_FILE).read_text()
        assert (folder / TIMINGS_FILE).is_file()
        hashes.append(folder_sha256(folder))
        assert read_history(folder) == [{"step": 1, "train/loss": 0.69, "train/tokens_per_s": speed}]
    assert hashes[0] == hashes[1]
    (folder / TRAIN_HISTORY_FILE).write_text('{"step": 1, "train/loss": 0.7}\n')  # a real change still shows
    assert folder_sha256(folder) != hashes[0]
