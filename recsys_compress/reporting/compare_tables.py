"""Pair the cells of two ``recsys-compression-table`` invocations on the same base, user by user.

A table pairs each allocation with its uniform twin only within one invocation. Two invocations
on the same run directory test the same users in the same order (``per_user``), so any cell of
one can be paired with any cell of the other: B's cell over A's cell, with the paired bootstrap
interval of the ratio of their mean NDCG@10 (``evaluation.bootstrap.retention``). Cells are
matched on method, ratio and alignment; ``--a``/``--b`` pick the allocation on each side.

    recsys-compare-tables outputs/allocation/ml1m_llama_tiny.json \
        outputs/allocation/ml1m_llama_tiny_zs_val.json --a zero_sum --b zero_sum
    recsys-compare-tables outputs/allocation/ml1m_llama_tiny.json \
        outputs/allocation/ml1m_llama_tiny_zs_val.json --a global_relative --b zero_sum
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from recsys_compress.evaluation.bootstrap import retention

KEY = "b_over_a/ndcg@10"


def load_cells(path: Path) -> tuple[dict, dict[tuple, torch.Tensor]]:
    """A table's JSON and its cells' per-user NDCG@10 by (method, allocation, ratio, alignment)."""
    table = json.loads(Path(path).read_text())
    if "per_user" not in table:
        raise ValueError(f"{path} keeps no per-user NDCG@10 (written by an older compression_table.py)")
    cells = {(r["method"], r["allocation"], r["ratio"], r["alignment"]): torch.tensor(users)
             for r, users in zip(table["rows"], table["per_user"]["rows"])}
    return table, cells


def compare(a: Path, b: Path, a_allocation: str, b_allocation: str, seed: int = 0) -> list[dict]:
    """One row per cell of ``b`` with allocation ``b_allocation`` whose twin in ``a`` (same method,
    ratio, alignment; allocation ``a_allocation``) exists: B / A and its paired interval."""
    table_a, cells_a = load_cells(a)
    table_b, cells_b = load_cells(b)
    if table_a["per_user"]["base"] != table_b["per_user"]["base"]:
        raise ValueError(f"{a} and {b} tested different base models or users "
                         f"(base test NDCG@10 {table_a['base']['test/ndcg@10']:.4f} vs "
                         f"{table_b['base']['test/ndcg@10']:.4f}): their cells cannot be paired")
    rows = []
    for (method, allocation, ratio, alignment), users_b in cells_b.items():
        users_a = cells_a.get((method, a_allocation, ratio, alignment))
        if allocation != b_allocation or users_a is None:
            continue
        rows.append({"method": method, "ratio": ratio, "alignment": alignment, "a": a_allocation,
                     "b": b_allocation, **retention(float(users_a.mean()), float(users_b.mean()), users_a,
                                                    users_b, key=KEY, seed=seed)})
    if not rows:
        raise ValueError(f"no cell of {b} with allocation {b_allocation} has a twin with allocation "
                         f"{a_allocation} in {a}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="the reference table's JSON (denominator)")
    parser.add_argument("b", type=Path, help="the other table's JSON (numerator)")
    parser.add_argument("--a", dest="a_allocation", default="uniform", help="allocation of A's cells")
    parser.add_argument("--b", dest="b_allocation", default="uniform", help="allocation of B's cells")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        rows = compare(args.a, args.b, args.a_allocation, args.b_allocation)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"| method | ratio | alignment | {args.b.name} {args.b_allocation} / {args.a.name} {args.a_allocation} |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ratio']} | {r['alignment']} | {r[KEY]:.3f} "
              f"[{r[KEY + '_ci_low']:.3f}, {r[KEY + '_ci_high']:.3f}] |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
