"""recsys_compress/reporting/compare_tables.py: cells of two compression_table invocations paired by user."""

import json

import pytest

from recsys_compress.reporting import compare_tables


def table(path, base, cells):
    """A compression_table JSON as the script writes it: rows and per-user NDCG@10."""
    rows = [{"method": "odllm", "allocation": a, "ratio": r, "alignment": al} for a, r, al, _ in cells]
    path.write_text(json.dumps({"base": {"test/ndcg@10": sum(base) / len(base)}, "rows": rows,
                                "per_user": {"base": base, "rows": [users for *_, users in cells]}}))
    return path


def test_cells_pair_by_method_ratio_alignment_and_the_chosen_allocations(tmp_path, capsys):
    base = [0.5, 0.25, 0.125, 1.0]
    users = [0.25, 0.125, 0.0, 0.5]
    a = table(tmp_path / "a.json", base, [("uniform", 0.3, "none", users), ("zero_sum", 0.3, "none", users),
                                          ("zero_sum", 0.5, "none", base)])
    b = table(tmp_path / "b.json", base, [("zero_sum", 0.3, "none", [2 * u for u in users]),
                                          ("uniform", 0.3, "none", users),  # not the allocation asked for
                                          ("zero_sum", 0.5, "progressive", base)])  # no twin in a: left out
    rows = compare_tables.compare(a, b, "zero_sum", "zero_sum")
    assert [(r["ratio"], r["alignment"]) for r in rows] == [(0.3, "none")]
    # twice every user's NDCG: the ratio is 2 in every resample, so the interval is [2, 2]
    key = compare_tables.KEY
    assert (rows[0][key], rows[0][key + "_ci_low"], rows[0][key + "_ci_high"]) == pytest.approx((2, 2, 2), abs=1e-12)
    assert compare_tables.main([str(a), str(b), "--a", "uniform", "--b", "zero_sum"]) == 0
    assert "| odllm | 0.3 | none | 2.000 [2.000, 2.000] |" in capsys.readouterr().out


def test_tables_of_other_users_or_without_twins_are_refused(tmp_path, capsys):
    a = table(tmp_path / "a.json", [0.5, 0.25], [("uniform", 0.3, "none", [0.25, 0.25])])
    other = table(tmp_path / "other.json", [0.5, 0.5], [("zero_sum", 0.3, "none", [0.25, 0.25])])
    assert compare_tables.main([str(a), str(other), "--b", "zero_sum"]) == 2
    assert "tested different base models or users" in capsys.readouterr().err
    b = table(tmp_path / "b.json", [0.5, 0.25], [("zero_sum", 0.5, "none", [0.25, 0.25])])
    with pytest.raises(ValueError, match="no cell of .* with allocation zero_sum has a twin with allocation uniform"):
        compare_tables.compare(a, b, "uniform", "zero_sum")
