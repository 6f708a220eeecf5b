import random

import pytest

from dasheng_pipeline.sources import lists

AUDIOSET = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=4, num_segs=4, num_unique_labels=527, num_positive_labels=6
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
--ZhevVpy1s, 50.000, 60.000, "/m/012xff"
--aE2O5G5WE, 0.000, 10.000, "/m/03fwl,/m/04rlf,/m/09x0r"
--PJHxphWEs, 30.000, 40.000, "/m/09x0r"
"""


def write(tmp_path, text, name="list.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_count_rows_agrees_with_iteration_on_random_files(tmp_path, monkeypatch):
    rng = random.Random(7)
    pieces = [
        b"abc\n",
        b"\n",
        b"\r\n",
        b"#c\n",
        b"x\r\n",
        b"#\r\n",
        b"\r",
        b"y",
        b"  \n",
        b"z,1,2\n",
    ]
    for _ in range(400):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        path = write(tmp_path, data)
        monkeypatch.setattr(lists, "_BLOCK", rng.choice([1, 2, 3, 7, 1 << 20]))
        assert lists.count_rows(path) == sum(1 for _ in lists.iter_rows(path)), data


def test_audioset_rows_labels_and_duplicates(tmp_path):
    path = write(tmp_path, AUDIOSET)
    assert lists.count_rows(path) == 4
    index = lists.build_index(path, "audioset", chunk_size=3, segment_s=10)
    assert index["rows"] == 4 and len(index["offsets"]) == 2
    assert index["duplicates"] == {"3": 0}
    first = lists.read_chunk(path, "audioset", index, 0, 10)
    assert [s.ytid for s in first] == ["--PJHxphWEs", "--ZhevVpy1s", "--aE2O5G5WE"]
    assert first[0].start_s == 30.0 and first[0].end_s == 40.0
    assert first[0].labels == ["/m/09x0r", "/t/dd00088"]
    assert first[0].clip_id == "--PJHxphWEs_30000"
    second = lists.read_chunk(path, "audioset", index, 1, 10)
    assert len(second) == 1 and second[0].row == 3
    assert second[0].error == "duplicate of row 0 (same video and start)"


def test_vggsound_is_ten_seconds_from_start(tmp_path):
    path = write(
        tmp_path, '---g-f_I2yQ,1,people marching,test\n--0PQM4-hqg,30,"waterfall, burbling",train\n'
    )
    index = lists.build_index(path, "vggsound", 10, segment_s=10)
    segs = lists.read_chunk(path, "vggsound", index, 0, 10)
    assert [(s.start_s, s.end_s) for s in segs] == [(1.0, 11.0), (30.0, 40.0)]
    assert segs[1].labels == ["waterfall, burbling"] and not segs[1].error


def test_acav100m_header_csv_and_id_only_lines(tmp_path):
    path = write(tmp_path, "ytid,start_seconds,end_seconds\nabcdefghijk,12.5,22.5\n")
    index = lists.build_index(path, "acav100m", 10, 10)
    segs = lists.read_chunk(path, "acav100m", index, 0, 10)
    assert len(segs) == 1 and (segs[0].start_s, segs[0].end_s) == (12.5, 22.5)
    path = write(tmp_path, "abcdefghijk\nABCDEFGHIJK\n", "ids.txt")
    index = lists.build_index(path, "acav100m", 10, 10)
    segs = lists.read_chunk(path, "acav100m", index, 0, 10)
    assert [(s.ytid, s.start_s, s.end_s) for s in segs] == [
        ("abcdefghijk", 0.0, 10.0),
        ("ABCDEFGHIJK", 0.0, 10.0),
    ]


@pytest.mark.parametrize(
    "row, reason",
    [
        (
            "--PJHxphWEs, 30.000",
            "expected 'YTID, start_seconds, end_seconds, positive_labels', got 2 field(s)",
        ),
        ('--PJHxphWEs, 40.000, 30.000, "/m/x"', "end_seconds 30 is not after start_seconds 40"),
        ('--PJHxphWEs, -5, 5, "/m/x"', "start_seconds -5 is negative"),
        ('--PJHxphWEs, abc, 5, "/m/x"', "start_seconds 'abc' is not a number"),
        ('--PJHxphWEs, nan, 5, "/m/x"', "start_seconds 'nan' is not finite"),
        ('../../etc/p, 0, 10, "/m/x"', "'../../etc/p' is not a YouTube ID"),
        ('$(reboot)xx, 0, 10, "/m/x"', "'$(reboot)xx' is not a YouTube ID"),
        ('short, 0, 10, "/m/x"', "'short' is not a YouTube ID"),
    ],
)
def test_bad_rows_become_errors_with_reasons(tmp_path, row, reason):
    path = write(tmp_path, "# header\n" + row + "\n")
    index = lists.build_index(path, "audioset", 10, 10)
    [seg] = lists.read_chunk(path, "audioset", index, 0, 10)
    assert seg.error.startswith(reason), seg.error


def test_chunk_beyond_the_list_names_the_problem(tmp_path):
    path = write(tmp_path, AUDIOSET)
    index = lists.build_index(path, "audioset", 10, 10)
    with pytest.raises(IndexError, match="list changed after its index was built"):
        lists.read_chunk(path, "audioset", index, 3, 10)
