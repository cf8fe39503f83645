"""Batch-1 latency of one recommendation from generative artefacts, side by side in one process.

Each artefact is a ``train.py item_ids=semantic ... export.onnx=true`` run's ``RUN_DIR/onnx``
(the step graph + the constrained beam search around it, ``recsys_compress/deploy/generative.py``).
Every round loads them all on one shared onnxruntime thread pool (``--threads``) and times
``recommend(history, k)`` call by call in turn, the order rotated each call, so a change in the
machine's load hits every artefact alike; the ratio of each to the first is taken per round and
summarised over ``--rounds`` as the median ratio with its bootstrap interval
(``paired_median_ratio``). The history is ``--length`` random catalogue items (fixed seed).

    python experiments/bench_generative_artefact.py BASE/onnx ODLLM/onnx ODLLM_INT8/onnx \\
        --names base odllm@0.5 odllm@0.5+int8 --threads 1 --rounds 5 --reps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from recsys_compress.deploy.recommend import share_one_thread_pool
from recsys_compress.deploy.serve import open_artefact
from recsys_compress.evaluation.bootstrap import paired_median_ratio


def time_round(recs: dict, history: list[str], k: int, reps: int, shift: int) -> dict[str, float]:
    """Median latency (ms) of ``reps`` interleaved batch-1 recommendations per artefact."""
    names = list(recs)
    for rec in recs.values():  # warm-up: onnxruntime plans memory and packs weights on the first calls
        for _ in range(3):
            rec.recommend(history, k)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        j = (i + shift) % len(names)
        for name in names[j:] + names[:j]:
            t0 = time.perf_counter()
            recs[name].recommend(history, k)
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artefacts", nargs="+", type=Path, help="RUN_DIR/onnx folders; the first is the reference")
    parser.add_argument("--names", nargs="+", help="a label per artefact (default: the run folder's name)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--length", type=int, default=50, help="history length in items")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    names = args.names or [a.parent.name for a in args.artefacts]
    if len(names) != len(args.artefacts):
        parser.error(f"{len(names)} names for {len(args.artefacts)} artefacts")
    share_one_thread_pool(args.threads)
    recs = {name: open_artefact(folder) for name, folder in zip(names, args.artefacts)}
    first = recs[names[0]]
    history = [first.item_ids[i] for i in np.random.default_rng(0).integers(0, len(first.item_ids), args.length)]
    rounds = [time_round(recs, history, args.k, args.reps, shift) for shift in range(args.rounds)]
    out = {"threads": args.threads, "length": args.length, "k": args.k, "rows": []}
    for name, folder in zip(names, args.artefacts):
        meta = json.loads((folder / "deploy.json").read_text())
        latency = [r[name] for r in rounds]
        row = {"artefact": name, "megabytes": meta["megabytes"], "latency_ms": statistics.median(latency),
               "ratio": paired_median_ratio([r[names[0]] for r in rounds], latency)}
        out["rows"].append(row)
        ratio = row["ratio"]
        print(f"{name:>24}  {row['megabytes']:7.2f} MB  {row['latency_ms']:8.2f} ms  "
              f"x{ratio['median']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
