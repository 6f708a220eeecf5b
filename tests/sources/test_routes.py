"""What routes and mirror sources mean when the DAG is built: ID lists of every format, the
routes' order and their one-line config errors, shard names (braces, globs, hf:// URLs), chunks."""

from __future__ import annotations

import pytest

from dasheng_pipeline.sources import chunking, remote, routes


def test_id_lists_name_clips_as_their_mirrors_do(tmp_path):
    audioset = tmp_path / "as.csv"
    audioset.write_text(
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n'
        'bad/id, 0, 10, ""\n'
    )
    vgg = tmp_path / "vgg.csv"
    vgg.write_text("---g-f_I2yQ,1,people marching,test\n")
    tsv = tmp_path / "raw_30s.tsv"
    tsv.write_text(
        "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\ntrack_1376256\tartist_1\talbum_1\t56/1376256.mp3\t166.0\tgenre---chillout\tinstrument---piano\n"
    )
    got = routes.read_id_list(audioset, "audioset")
    assert [(r.id, r.labels, bool(r.error)) for r in got] == [
        ("--PJHxphWEs", ["/m/09x0r", "/t/dd00088"], False),
        ("row1", [], True),
    ]
    assert routes.read_id_list(vgg, "vggsound")[0].id == "---g-f_I2yQ_000001"
    jam = routes.read_id_list(tsv, "jamendo")[0]
    assert (jam.id, jam.labels) == ("56/1376256", ["genre---chillout", "instrument---piano"])
    ids = tmp_path / "ids.txt"
    ids.write_text("demo-000001,tone\ndemo-000001,tone\n")
    out = tmp_path / "ids.parquet"
    info = routes.write_ids(str(ids), "ids", 10.0, str(out), {"seed": 0})
    assert (info["listed"], info["repeated"]) == (1, 1)
    assert "demo-000001" in routes.IdSet.from_tables([out], winners_only=False)
    assert "demo-000002" not in routes.IdSet.from_tables([out], winners_only=False)


SOURCES = {
    "hf": {"type": "hf_parquet"},
    "yt": {"type": "youtube", "list": "a.csv", "format": "audioset"},
    "loc": {"type": "local"},
}


def test_routes_know_the_routes_before_them():
    corpora = {"c": {"list": "a.csv", "format": "audioset", "routes": ["hf", "yt"]}}
    got = chunking.routes(corpora, SOURCES)
    assert got == {
        "hf": chunking.Route("c", 0, ()),
        "yt": chunking.Route("c", 1, ("hf",)),
    }


@pytest.mark.parametrize(
    "routes_, list_, message",
    [
        (["hf", "nope"], "a.csv", "config key corpora.c.routes: 'nope' is not a source"),
        (["loc"], "a.csv", "config key corpora.c.routes: a local source cannot be a route ('loc')"),
        (
            ["hf", "yt"],
            "b.csv",
            "config key sources.yt.list: a route of corpus c reads its list 'b.csv'",
        ),
    ],
)
def test_route_errors_are_one_line_naming_the_key(routes_, list_, message):
    corpora = {"c": {"list": list_, "format": "audioset", "routes": routes_}}
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        chunking.routes(corpora, SOURCES)


def test_a_source_is_a_route_of_one_corpus_only():
    corpora = {
        "c": {"list": "a.csv", "format": "audioset", "routes": ["hf"]},
        "d": {"list": "a.csv", "format": "audioset", "routes": ["hf"]},
    }
    with pytest.raises(ValueError, match="source 'hf' is already a route of corpus c"):
        chunking.routes(corpora, SOURCES)


def test_shard_names_expand_braces_and_globs_in_order(tmp_path):
    for name in ("b-1.tar", "b-0.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"")
    got = remote.expand(
        [str(tmp_path / "b-*.tar"), str(tmp_path / "a.tar"), "https://x.org/s-{00..02}.tar"]
    )
    assert [g.rsplit("/", 1)[-1] for g in got] == [
        "b-0.tar",
        "b-1.tar",
        "a.tar",
        "s-00.tar",
        "s-01.tar",
        "s-02.tar",
    ]
    hub = remote.parse_hf_url(
        "hf://datasets/Loie/VGGSound@refs%2Fconvert%2Fparquet/vggsound_00.tar.gz"
    )
    assert (hub.repo, hub.revision, hub.path) == (
        "Loie/VGGSound",
        "refs/convert/parquet",
        "vggsound_00.tar.gz",
    )
    assert remote.parse_hf_url("hf://datasets/a/b/x/y.tar").revision == "main"
    with pytest.raises(ValueError, match="expected hf://datasets/<owner>/<name>"):
        remote.parse_hf_url("hf://datasets/a/b")


def test_chunks_group_units_and_a_snapshot_needs_path_or_repo(tmp_path):
    src = {"type": "webdataset", "shards_per_chunk": 2}
    assert chunking.chunks_of(src, ["a", "b", "c"]) == [["a", "b"], ["c"]]
    assert chunking.chunks_of(src, []) == [[]]
    with pytest.raises(ValueError, match="config key sources.m: give either path"):
        chunking.units("m", {"type": "hf_parquet", "path": None, "repo": None})
    (tmp_path / "data/sub").mkdir(parents=True)
    for name in ("data/b.parquet", "data/sub/a.parquet", "data/x.json", ".cache/z.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    snap = {"type": "hf_parquet", "path": str(tmp_path), "include": ["data/*.parquet"], "files": []}
    assert chunking.units("m", snap) == ["data/b.parquet", "data/sub/a.parquet"]  # '*' crosses '/'
    assert chunking.local_inputs(snap, ["data/b.parquet"]) == [str(tmp_path / "data/b.parquet")]


def test_the_plan_chunks_mirrors_from_listings_and_places_routes(tmp_path, monkeypatch):
    from dasheng_pipeline import plan
    from dasheng_pipeline.common import schema

    monkeypatch.chdir(tmp_path)
    for name in (
        "snap/data/a.parquet",
        "snap/data/b.parquet",
        "snap/data/c.parquet",
        "wds/s-0.tar",
        "wds/s-1.tar",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sha.txt").write_text(
        f"{'a' * 64}  raw_30s_audio-00.tar\n{'b' * 64} *raw_30s_audio-01.tar\n"
    )
    (tmp_path / "list.csv").write_text('abcdefghijk, 0, 10, ""\n')
    cfg = schema.with_defaults(
        {
            "sources": {
                "hf": {
                    "type": "hf_parquet",
                    "path": "snap",
                    "include": ["data/*.parquet"],
                    "id_column": "id",
                    "files_per_chunk": 2,
                },
                "wds": {"type": "webdataset", "urls": ["wds/s-*.tar"]},
                "jam": {
                    "type": "http_archive",
                    "checksums": "sha.txt",
                    "base_url": "https://x.org/a",
                },
                "yt": {"type": "youtube", "list": "list.csv"},
            },
            "corpora": {"c": {"list": "list.csv", "routes": ["hf", "yt"]}},
        }
    )
    sources = plan.resolve_sources(cfg)
    assert sources["hf"].units == (("data/a.parquet", "data/b.parquet"), ("data/c.parquet",))
    assert sources["hf"].chunks == ("00000", "00001")
    assert sources["wds"].units == (("wds/s-0.tar",), ("wds/s-1.tar",))
    assert [u[0]["url"] for u in sources["jam"].units] == [
        "https://x.org/a/raw_30s_audio-00.tar",
        "https://x.org/a/raw_30s_audio-01.tar",
    ]
    assert sources["yt"].route == chunking.Route("c", 1, ("hf",)) and sources["jam"].route is None
    cfg["allow_outside_paths"] = False
    cfg["sources"]["hf"]["path"] = "/tmp"
    with pytest.raises(ValueError, match="config key sources.hf.path: '/tmp' lies outside"):
        plan.resolve_sources(cfg)
