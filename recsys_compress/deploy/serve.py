"""``recsys-recommend``: top-K next items for a history, from an exported artefact.

    recsys-recommend ARTEFACT_DIR --history 1 50 260 --k 10
    python -m recsys_compress.deploy.serve ARTEFACT_DIR --history 1 50 260 --k 10 --json

The history is given in the dataset's raw item ids (e.g. MovieLens movieId), oldest first.
Items of the history are excluded from the result (as in the evaluation protocol) unless
``--keep-seen`` is given. An atomic model's artefact runs on numpy and onnxruntime alone
(``deploy/recommend.py``); a generative one's beam search needs torch (``deploy/generative.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from recsys_compress.deploy.recommend import Recommender


def open_artefact(folder: str | Path, threads: int | None = None) -> Recommender:
    """The runner an artefact needs: ``Recommender`` (an atomic model's scores; numpy and
    onnxruntime only) or, for a generative model's, ``deploy.generative.GenerativeRecommender``
    (beam search; needs torch)."""
    meta_path = Path(folder) / "deploy.json"
    kind = json.loads(meta_path.read_text()).get("recommender", "atomic") if meta_path.is_file() else "atomic"
    if kind == "generative":
        from recsys_compress.deploy.generative import GenerativeRecommender

        return GenerativeRecommender(folder, threads)
    return Recommender(folder, threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artefact", type=Path, help="folder written by export (model.onnx, items.json, deploy.json)")
    parser.add_argument("--history", nargs="+", required=True, help="raw item ids, oldest first")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--keep-seen", action="store_true", help="allow items of the history in the result")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        recs = open_artefact(args.artefact, args.threads).recommend(args.history, args.k, not args.keep_seen)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in recs], ensure_ascii=False, indent=2))
    else:
        for rank, r in enumerate(recs, 1):
            print(f"{rank:>3}  {r.item_id:>8}  {r.score:8.3f}  {r.text}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
