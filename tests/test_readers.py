import re

import pytest

from conftest import SHARED_DATA, SMALL, head_lines
from recsys_compress.data.formats import read_interactions
from recsys_compress.data.readers import (
    DataFormatError,
    read_grouplens_csv,
    read_recbole_atomic,
    read_sequence_text,
)


def test_grouplens_reads_vendored_ml_latest_small():
    raw = read_grouplens_csv(SMALL)
    assert len(raw) == 100_836
    assert len(set(raw.users)) == 610 and len(set(raw.items)) == 9_724
    assert (raw.users[0], raw.items[0], raw.ratings[0], raw.timestamps[0]) == ("1", "1", 4.0, 964982703.0)
    toy = raw.item_info["1"]
    assert toy.title == "Toy Story (1995)" and toy.year == "1995"
    assert toy.genres == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert toy.text() == "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy"


def test_grouplens_title_with_comma_is_one_field():
    raw = read_grouplens_csv(SMALL)
    # movies.csv quotes titles that contain commas
    assert raw.item_info["11"].title == "American President, The (1995)"


def test_a_file_without_a_final_newline_is_read_with_a_warning_naming_its_last_line(tmp_path, caplog):
    """A cut-off copy ends mid-line: its last timestamp parses as a valid, wrong number."""
    folder = tmp_path / "gl"
    head_lines(SMALL / "ratings.csv", folder / "ratings.csv", 5)
    with open(folder / "ratings.csv", "a") as f:
        f.write("7,42,4.0,96498")
    with caplog.at_level("WARNING"):
        raw = read_grouplens_csv(folder)
    assert len(raw.users) == 5
    assert (f"{folder / 'ratings.csv'} does not end with a newline: it may be truncated (an interrupted copy?); "
            "its last line is '7,42,4.0,96498'") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        read_grouplens_csv(SMALL)
    assert "does not end with a newline" not in caplog.text


def test_grouplens_malformed_line_names_file_line_and_content(tmp_path):
    folder = tmp_path / "gl"
    head_lines(SMALL / "ratings.csv", folder / "ratings.csv", 5)
    with open(folder / "ratings.csv", "a") as f:
        f.write("7,42,four,964982703\n")
    with pytest.raises(DataFormatError, match=r"ratings.csv:6: column 'rating'.*'7,42,four,964982703'"):
        read_grouplens_csv(folder)


def test_missing_file_names_path_and_expected_files(tmp_path):
    with pytest.raises(DataFormatError, match=r"(?s)ratings.csv.*expected: ratings.csv \(userId"):
        read_grouplens_csv(tmp_path)
    with pytest.raises(DataFormatError, match=r"(?s)foo.inter.*expected: foo.inter.*does not exist"):
        read_recbole_atomic(tmp_path / "foo")


def test_recbole_ml100k_typed_header_and_item_text(ml100k_slice):
    raw = read_recbole_atomic(ml100k_slice, "ml-100k")
    assert len(raw) == 3000
    assert (raw.users[0], raw.items[0], raw.ratings[0], raw.timestamps[0]) == ("196", "242", 3.0, 881250949.0)
    toy = raw.item_info["1"]
    assert toy.title == "Toy Story" and toy.year == "1995"
    assert toy.text() == "Toy Story (1995). Genres: Animation, Children's, Comedy"


def test_recbole_ml1m_crlf_and_title_ids(ml1m_slice):
    assert b"\r\n" in (ml1m_slice / "ml-1m.inter").read_bytes()[:200]
    raw = read_recbole_atomic(ml1m_slice)  # name defaults to the folder name
    assert len(raw) == 3000
    assert raw.users[0] == "1m_1"
    assert raw.items[0] == "One Flew Over the Cuckoo's Nest (1975)"
    assert not any("\r" in x for x in raw.users + raw.items)
    assert raw.ratings[0] == 5.0
    info = raw.item_info["Toy Story (1995)"]
    assert info.year == "1995" and info.genres == ["Animation", "Children's", "Comedy"]
    assert info.text() == "Toy Story (1995). Genres: Animation, Children's, Comedy"


def test_recbole_bad_header_and_short_row(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "x.inter").write_text("user_id\titem_id:token\n1\t2\n")
    with pytest.raises(DataFormatError, match=r"x.inter:1: header column 'user_id' is not 'name:type'"):
        read_recbole_atomic(folder)
    (folder / "x.inter").write_text("user_id:token\titem_id:token\n1\t2\n3\n")
    with pytest.raises(DataFormatError, match=r"x.inter:3: expected 2 tab-separated fields.*'3'"):
        read_recbole_atomic(folder)
    (folder / "x.inter").write_text("user_id:token\titem_id:blob\n")
    with pytest.raises(DataFormatError, match="unknown type 'blob'"):
        read_recbole_atomic(folder)


def test_sequence_text_keeps_order_across_lines(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("u1 10 11 12\r\nu2 12 10\n\nu1 13\n")
    raw = read_sequence_text(path)
    assert raw.users == ["u1", "u1", "u1", "u2", "u2", "u1"]
    assert raw.items == ["10", "11", "12", "12", "10", "13"]
    assert raw.timestamps == sorted(raw.timestamps)
    assert raw.ratings is None


def test_sequence_text_malformed_line(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("u1 1 2\nu2\n")
    with pytest.raises(DataFormatError, match=r"seq.txt:2: expected 'user item \[item \.\.\.\]'.*'u2'"):
        read_sequence_text(path)


@pytest.mark.parametrize("junk", ["abc", "1.5", "-3", "@@@"])
def test_sequence_text_item_ids_that_are_not_integers_name_file_and_line(tmp_path, junk):
    path = tmp_path / "seq.txt"
    path.write_text(f"u1 1 2 3\nu2 4 {junk} 5\n")
    with pytest.raises(DataFormatError, match=rf"seq.txt:2: item id '{re.escape(junk)}' is not a non-negative integer"):
        read_sequence_text(path)


@pytest.mark.parametrize("fmt, name", [("sequence_text", "seq.txt"), ("grouplens_csv", "ratings.csv"),
                                       ("recbole_atomic", "x.inter")])
def test_a_file_that_is_not_utf8_names_itself(tmp_path, fmt, name):
    folder = tmp_path / "x"
    folder.mkdir()
    path = folder / name
    path.write_bytes(b"u1 1 2\n\x89PNG\r\n\x1a\n\xff\xfe binary")
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(path))}:2: not UTF-8 text \(byte 0x89 at offset 7\)"):
        read_interactions(fmt, path if fmt == "sequence_text" else folder)


def test_unknown_format_lists_allowed():
    with pytest.raises(ValueError, match="allowed: grouplens_csv, recbole_atomic, sequence_text"):
        read_interactions("parquet", SMALL)


def test_shared_data_is_present():
    # The RecBole tests read slices of ../shared/data; fail loudly if it is not beside the repo.
    assert (SHARED_DATA / "ml-100k" / "ml-100k.inter").is_file(), f"expected shared data at {SHARED_DATA}"


def test_the_suite_refuses_to_start_without_the_shared_data_naming_where_it_looked(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "RECSYS_DATA_ROOT": str(tmp_path / "nowhere")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_split.py"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert f"test data not found: {tmp_path / 'nowhere' / 'ml-100k'}" in out.stdout + out.stderr
    assert "set RECSYS_DATA_ROOT" in out.stdout + out.stderr
