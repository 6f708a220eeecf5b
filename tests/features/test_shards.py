from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dasheng_pipeline.common import atomic
from dasheng_pipeline.features import shards


def writer(path, rows=5, row_group_size=2):
    w = shards.ShardWriter(path, 4, 11, {"mel": {"n_mels": 4}}, row_group_size, "zstd")
    rng = np.random.default_rng(0)
    mels = []
    for i in range(rows):
        m = rng.standard_normal((4, 11)).astype(np.float32) * 30
        mels.append(m.astype(np.float16))
        w.add(f"clip{i}", "src", i % 2, 10.0 * (i % 2), 11 - i, ["a", "b"][: i % 3], m)
    return w, mels


def test_round_trip_schema_and_row_groups(tmp_path):
    path = tmp_path / "s.parquet"
    w, mels = writer(path)
    rows, digest, size = w.close()
    assert rows == 5 and size == path.stat().st_size and digest == atomic.sha256_file(path)
    pf = pq.ParquetFile(path)
    assert pf.metadata.num_row_groups == 3
    assert isinstance(pf.schema_arrow.field("mel").type, pa.FixedShapeTensorType)
    assert pf.schema_arrow.field("mel").type.shape == [4, 11]
    assert shards.read_meta(path)["mel"] == {"n_mels": 4}
    batches = list(
        shards.iter_batches(
            path, batch_size=5, columns=("clip_id", "mel", "valid_frames", "labels")
        )
    )
    got = np.concatenate([b["mel"] for b in batches])
    assert got.dtype == np.float16 and np.array_equal(got, np.stack(mels))
    assert batches[0]["clip_id"][:2] == ["clip0", "clip1"]
    assert list(np.concatenate([b["valid_frames"] for b in batches])) == [11, 10, 9, 8, 7]


def test_any_memory_layout_is_stored_as_n_mels_by_frames(tmp_path):
    w = shards.ShardWriter(tmp_path / "s.parquet", 4, 11, {}, 2, "none")
    m = np.arange(44, dtype=np.float32).reshape(11, 4).T  # a transposed (Fortran-ordered) view
    w.add("c", "s", 0, 0.0, 11, [], m)
    w.close()
    [batch] = shards.iter_batches(tmp_path / "s.parquet", 4)
    assert np.array_equal(batch["mel"][0], m.astype(np.float16))


def test_part_writer_splits_a_chunk_into_shards_of_max_rows(tmp_path):
    w = shards.PartWriter(tmp_path / "chunk", 4, 11, {}, 2, "none", max_rows=3)
    for i in range(7):
        w.add(f"clip{i // 2}", "s", i % 2, 0.0, 11, [], np.full((4, 11), i, np.float32))
    parts = w.close()
    assert [p["rows"] for p in parts] == [3, 3, 1]
    assert [Path(p["path"]).name for p in parts] == [
        "part-000.parquet",
        "part-001.parquet",
        "part-002.parquet",
    ]
    assert [p["clips"] for p in parts] == [2, 2, 1]
    for p in parts:
        shards.verify(p["path"], p["sha256"])
    values = [
        int(b["mel"][i, 0, 0])
        for p in parts
        for b in shards.iter_batches(p["path"], 8)
        for i in range(len(b["mel"]))
    ]
    assert values == list(range(7))
    empty = shards.PartWriter(tmp_path / "empty", 4, 11, {}, 2, "none", max_rows=3).close()
    assert len(empty) == 1 and empty[0]["rows"] == 0


def test_abort_leaves_nothing(tmp_path):
    path = tmp_path / "s.parquet"
    w, _ = writer(path)
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_wrong_shape_is_refused(tmp_path):
    w = shards.ShardWriter(tmp_path / "s.parquet", 4, 11, {}, 2, "none")
    with pytest.raises(shards.ShardError, match=r"shape \(4, 10\), expected \(4, 11\)"):
        w.add("c", "s", 0, 0.0, 10, [], np.zeros((4, 10), np.float32))
    w.abort()


def test_verify_names_a_damaged_shard(tmp_path):
    path = tmp_path / "s.parquet"
    w, _ = writer(path)
    _, digest, _ = w.close()
    shards.verify(path, digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(shards.ShardError, match=r"s\.parquet: sha256 .* does not match"):
        shards.verify(path, digest)
    path.unlink()
    with pytest.raises(shards.ShardError, match="missing"):
        shards.verify(path, digest)


def test_foreign_parquet_is_not_a_shard(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), path)
    with pytest.raises(shards.ShardError, match="not a shard of this pipeline"):
        shards.read_meta(path)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(shards.ShardError, match="not a readable Parquet file"):
        shards.read_meta(tmp_path / "junk.parquet")


def test_combined_stats_equal_direct_statistics():
    rng = np.random.default_rng(4)
    parts_data = [rng.standard_normal((3, n)) * 10 - 40 for n in (5, 9)]
    parts = [
        {"frames": d.shape[1], "sum": d.sum(1).tolist(), "sumsq": (d**2).sum(1).tolist()}
        for d in parts_data
    ]
    stats = shards.combine_stats(parts, 3)
    allframes = np.concatenate(parts_data, axis=1)
    np.testing.assert_allclose(stats["mean"], allframes.mean(1), atol=1e-5)
    np.testing.assert_allclose(stats["std"], allframes.std(1), atol=1e-5)
    assert stats["frames"] == 14
