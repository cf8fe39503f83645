"""LC-Rec's JSON layout (data/lcrec.py): the reader, the index read and written, the split."""

import json

import pytest
import torch

from conftest import SHARED_DATA
from recsys_compress.data.datamodule import NextItemDataModule
from recsys_compress.data.lcrec import colliding_groups, index_stats, read_index, read_lcrec, write_index
from recsys_compress.data.readers import DataFormatError

INSTRUMENTS = SHARED_DATA / "instruments"


def test_the_published_instruments_files_read_as_lc_rec_counts_them():
    raw = read_lcrec(INSTRUMENTS, "Instruments")
    assert (len(raw.users), len(set(raw.users)), len(set(raw.items))) == (206_153, 24_772, 9_922)
    inter = json.loads((INSTRUMENTS / "Instruments.inter.json").read_text())
    first = [item for user, item in zip(raw.users, raw.items) if user == "1"]
    assert first == [str(i) for i in inter["1"]]  # each user's items in their order
    index = read_index(INSTRUMENTS / "Instruments.index.json", raw.items)
    stats = index_stats(index)
    # 9,897 tuples over 9,922 items: 23 groups of duplicate products share a tuple
    assert (stats["items"], stats["tuples"], stats["levels"], stats["colliding_groups"]) == (9_922, 9_897, 4, 23)
    assert stats["colliding_items"] - stats["colliding_groups"] == 9_922 - 9_897
    assert index["0"] == ("<a_137>", "<b_112>", "<c_79>", "<d_200>")


def test_an_index_written_reads_back_identical_and_as_lc_rec_wrote_it(tmp_path):
    published = INSTRUMENTS / "Instruments.index.json"
    index = read_index(published)
    written = write_index(tmp_path / "Copy.index.json", index)
    assert read_index(written) == index
    assert json.loads(written.read_text()) == json.loads(published.read_text())  # the same JSON object


def lcrec_slice(folder, users=300):
    """The first ``users`` users of Instruments in LC-Rec's layout, and the same sequences as
    sequence text (``user item item ...``)."""
    inter = json.loads((INSTRUMENTS / "Instruments.inter.json").read_text())
    chosen = dict(list(inter.items())[:users])
    folder.mkdir(parents=True)
    (folder / "Slice.inter.json").write_text(json.dumps(chosen))
    text = folder / "slice.txt"
    text.write_text("".join(f"{u} {' '.join(map(str, items))}\n" for u, items in chosen.items()))
    return folder, text


def test_the_split_is_the_atomic_datamodules_leave_one_out_of_the_same_sequences(tmp_path):
    folder, text = lcrec_slice(tmp_path / "slice")
    lcrec = NextItemDataModule(format="lcrec_json", path=str(folder), name="Slice", max_len=20, batch_size=64, seed=0)
    plain = NextItemDataModule(format="sequence_text", path=str(text), max_len=20, batch_size=64, seed=0)
    lcrec.setup(), plain.setup()
    assert lcrec.data.user_ids == plain.data.user_ids and lcrec.data.item_ids == plain.data.item_ids
    assert lcrec.data.sequences == plain.data.sequences
    inter = json.loads((folder / "Slice.inter.json").read_text())
    for split, position in (("test", -1), ("val", -2)):
        loader = lcrec.test_dataloader() if split == "test" else lcrec.val_dataloader()
        targets = torch.cat([b["target"] for b in loader])
        # LC-Rec: the last item is the test target, the one before it the validation target
        expected = [lcrec.data.item_ids.index(str(inter[u][position])) + 1 for u in lcrec.data.user_ids]
        assert targets.tolist() == expected, split
        other = plain.test_dataloader() if split == "test" else plain.val_dataloader()
        for a, b in zip(loader, other):
            assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "target"))


@pytest.mark.parametrize("content, message", [
    ('{"0": ["<a_1>", "<b_2>"], "1": ["<a_3>"', r"Bad.index.json:1:\d+: not valid JSON"),
    ('{"0": ["<a_1>", "<b_2>"], "1": ["<a_3>"]}',
     r"Bad.index.json: item '1' has 1 code tokens, item '0' has 2; every tuple must have the same length"),
    ('{"0": ["<a_1>", "b_2"]}', r"Bad.index.json: item '0' has code token 'b_2'; expected <letter_number>"),
    ('{"0": ["<a_1>", "<B_2>"]}', r"item '0' has code token '<B_2>'; expected <letter_number>"),
    ('{"0": ["<a_1>", "<b_2>"], "5": ["<a_1>", "<b_3>"]}',
     r"Bad.index.json: 1 item\(s\) of the interactions have no code tuple, e.g. item '7'"),
])
def test_a_bad_index_fails_naming_the_file_the_item_and_what_was_expected(tmp_path, content, message):
    path = tmp_path / "Bad.index.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message):
        read_index(path, items=["0", "5", "7"])


def test_bad_interactions_fail_naming_the_file_and_user(tmp_path):
    folder = tmp_path / "Bad"
    folder.mkdir()
    with pytest.raises(DataFormatError, match=r"(?s)data file not found: .*Bad.inter.json"):
        read_lcrec(folder)
    (folder / "Bad.inter.json").write_text('{"0": [1, 2], "1": []}')
    with pytest.raises(DataFormatError, match=r"Bad.inter.json: user '1' has \[\]; expected a non-empty list"):
        read_lcrec(folder)
    (folder / "Bad.inter.json").write_text('[1, 2]')
    with pytest.raises(DataFormatError, match=r"Bad.inter.json: expected an object \{user: \[item, ...\]\}"):
        read_lcrec(folder)


def test_item_text_is_read_where_lc_rec_has_it(tmp_path):
    folder = tmp_path / "Shop"
    folder.mkdir()
    (folder / "Shop.inter.json").write_text('{"u": [1, 2, 3]}')
    (folder / "Shop.item.json").write_text(json.dumps({
        "1": {"title": "Tuner", "description": "Clip-on", "brand": "Snark", "categories": "Accessories"},
        "2": {"title": "", "description": "Strings"}}))
    raw = read_lcrec(folder)
    assert raw.item_info["1"].title == "Tuner" and raw.item_info["1"].genres == ["Snark", "Accessories", "Clip-on"]
    assert raw.item_info["2"].title is None and "3" not in raw.item_info


def test_colliding_groups_are_the_items_that_share_a_tuple():
    index = {"a": ("<a_1>", "<b_1>"), "b": ("<a_1>", "<b_1>"), "c": ("<a_2>", "<b_1>"), "d": ("<a_1>", "<b_1>"),
             "e": ("<a_2>", "<b_1>"), "f": ("<a_3>", "<b_1>")}
    assert colliding_groups(index) == [["a", "b", "d"], ["c", "e"]]
