"""Constrained beam search against ``transformers``' ``generate``, on one trained generative model.

Takes a finished ``python train.py item_ids=semantic ...`` run, rebuilds its recommender (item
index from the cache, the trained base model), and ranks the first ``--users`` test users with
``--beams`` beams both ways, side by side in one process, one thread count:

- ours: ``models.generative.constrained_beam_search`` (the history's KV cache shared by a user's
  beams, the trie as dense per-level tables, seen items kept);
- ``model.generate(num_beams=B, num_return_sequences=B, prefix_allowed_tokens_fn=...)``: the same
  trie walked in Python for every beam at every step, greedy-free (``do_sample=False``).

Prints users per second of each (median over ``--rounds``), the speed-up and whether the
top-``--beams`` item lists are the same, user by user; ``--out`` writes them as JSON.

    python experiments/bench_beam_search.py RUN_DIR --users 256 --beams 20 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from recsys_compress.models.generative import constrained_beam_search
from recsys_compress.tasks.builders import build_datamodule, build_lit_module, build_model
from recsys_compress.tasks.compose import compose_config
from recsys_compress.tasks.config import validate
from recsys_compress.tasks.item_index import run_item_codes
from recsys_compress.tasks.trained_run import load_trained_base, run_overrides


def generate_top(lit, history, beams: int) -> torch.Tensor:
    """The top ``beams`` items per user by ``generate`` with the trie as ``prefix_allowed_tokens_fn``."""
    vocab, trie = lit.vocab, lit.trie
    length = history.input_ids.shape[1]
    offsets = torch.as_tensor(vocab.offsets)

    def allowed(_batch_id: int, sequence: torch.Tensor) -> list[int]:
        generated = sequence[length:]
        prefix = 0
        for level, token in enumerate(generated.tolist()):
            prefix = int(trie.children[level][prefix, token - vocab.offsets[level]])
            if prefix < 0:
                return []
        level = len(generated)
        codes = (trie.children[level][prefix] >= 0).nonzero().squeeze(1)
        return (codes + offsets[level]).tolist()

    out = lit.model.generate(
        input_ids=history.input_ids, attention_mask=history.attention_mask, num_beams=beams,
        num_return_sequences=beams, max_new_tokens=vocab.levels, min_new_tokens=vocab.levels, do_sample=False,
        prefix_allowed_tokens_fn=allowed, pad_token_id=0, eos_token_id=None, bos_token_id=None,
        length_penalty=1.0, early_stopping=False)
    tuples = out[:, length:].view(history.input_ids.shape[0], beams, vocab.levels)
    lookup = {tuple(t): i for i, t in enumerate(lit.item_tokens.tolist()) if i > 0}
    return torch.tensor([[lookup.get(tuple(t), 0) for t in user] for user in tuples.tolist()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--beams", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = compose_config(run_overrides(args.run_dir))
    run = validate(cfg)
    if run.item_ids != "semantic":
        raise SystemExit(f"{args.run_dir} trained item_ids={run.item_ids}: beam search ranks item_ids=semantic models")
    dm = build_datamodule(run.dataset, run.seed)
    codes, _ = run_item_codes(run, dm, cfg.paths.cache_dir)
    lit = build_lit_module(run, build_model(run.model, dm, cfg.paths.cache_dir, codes), codes).eval()
    source = load_trained_base(args.run_dir, lit, cfg.paths.cache_dir, run)
    batch = next(iter(dm.test_dataloader()))
    users = min(args.users, batch["input_ids"].shape[0])
    history = lit.sequence({k: v[:users] for k, v in batch.items()})

    def ours() -> torch.Tensor:
        return constrained_beam_search(lit.model, lit.vocab, lit.trie, history, args.beams)[0]

    times: dict[str, list[float]] = {"ours": [], "generate": []}
    results = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in (("ours", ours), ("generate", lambda: generate_top(lit, history, args.beams))):
                t0 = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - t0)
    same = (results["ours"] == results["generate"]).all(1)
    out = {"run": str(args.run_dir), "weights": source, "users": users, "beams": args.beams, "threads": args.threads,
           "levels": lit.vocab.levels, "history_tokens": history.input_ids.shape[1],
           "ours_users_per_s": users / statistics.median(times["ours"]),
           "generate_users_per_s": users / statistics.median(times["generate"]),
           "seconds": times, "same_lists": int(same.sum()), "same_top10": int(
               (results["ours"][:, :10] == results["generate"][:, :10]).all(1).sum())}
    out["speedup"] = out["ours_users_per_s"] / out["generate_users_per_s"]
    print(f"{users} users x {args.beams} beams, {lit.vocab.levels} levels, {args.threads} threads: ours "
          f"{out['ours_users_per_s']:.1f} users/s, generate {out['generate_users_per_s']:.1f} users/s "
          f"({out['speedup']:.1f}x); identical top-{args.beams} lists for {out['same_lists']} of {users} users "
          f"(top-10: {out['same_top10']})")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
