"""How far below chance can a proxy head go with the LLM frozen? (the evidence for the proxy's
default temperature and head learning rate, BENCHMARKS.md, proxy section)

Pools the final layer of every user and item once (over the token states `task=proxy` caches),
then trains a fresh `CompressionHead` per (temperature, lr, learned temperature) on training
pairs and measures the proxy loss on the same held-out validation pairs `task=proxy` uses.

    python3 experiments/proxy_head_sweep.py dataset=ml_1m ctr.split_by=item
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import torch

from recsys_compress.tasks.builders import build_ctr_datamodule, build_encoder
from recsys_compress.tasks.config import validate_proxy
from recsys_compress.representations.proxy import (CompressionHead, held_out_pairs, info_nce, proxy_texts,
                                                   proxy_token_states)
from recsys_compress.representations.token_states import llama_top, pooled
from recsys_compress.tasks.compose import compose_config


@torch.no_grad()
def pooled_finals(run, cfg, data) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled final-layer states of every user and item, through the frozen top blocks."""
    p = run.proxy
    encoder = build_encoder(run.representation, cfg.paths.cache_dir, run.seed)
    (i_s, i_m, *_), (u_s, u_m, *_) = proxy_token_states(
        encoder, data, proxy_texts(data, run.representation), run.representation, run.dataset.name, encoder.n_layers - p.trainable_layers, cfg.paths.cache_dir)
    top = llama_top(encoder, p.trainable_layers).eval()
    items = torch.cat([pooled(top, i_s[s:s + 128], i_m[s:s + 128]) for s in range(0, len(i_s), 128)])
    users = torch.cat([pooled(top, u_s[s:s + 64], u_m[s:s + 64]) for s in range(0, len(u_s), 64)])
    return users, items


def train_head(users, items, train_pairs, val_pairs, dim, batch, temperature, lr, learn_t, steps, seed):
    """(val loss before, val loss after, mean train loss of the last 100 steps, final temperature)."""
    torch.manual_seed(seed)
    head = CompressionHead(users.shape[1], dim)
    log_t = torch.nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_t)
    opt = torch.optim.AdamW([*head.parameters(), log_t], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    (tu, ti), (vu, vi) = train_pairs, val_pairs

    @torch.no_grad()
    def held_out() -> float:
        head.eval()
        losses = [float(info_nce(head(users[vu[s:s + batch]], "user"), head(items[vi[s:s + batch]], "item"),
                                 float(log_t.exp()))) for s in range(0, len(vu), batch)]
        head.train()
        return sum(losses) / len(losses)

    before, train = held_out(), []
    for _ in range(steps):
        idx = torch.randint(len(tu), (batch,), generator=generator)
        loss = info_nce(head(users[tu[idx]], "user"), head(items[ti[idx]], "item"), log_t.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        train.append(float(loss))
    return before, held_out(), sum(train[-100:]) / 100, float(log_t.exp())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of task=proxy")
    args = parser.parse_args(argv)
    cfg = compose_config(["task=proxy", "logger=none", *args.overrides], Path("outputs/adhoc/proxy_head_sweep"))
    run = validate_proxy(cfg)
    p = run.proxy
    data = build_ctr_datamodule(run).data
    users, items = pooled_finals(run, cfg, data)
    tu, ti, tl = data.splits["train"]
    train_pairs = (tu[tl > 0.5], ti[tl > 0.5])
    val_pairs = held_out_pairs(data.splits["val"], p.val_pairs, p.batch_size, run.seed)
    print(f"contrastive loss on {len(val_pairs[0])} held-out pairs; chance ln {p.batch_size} = "
          f"{math.log(p.batch_size):.3f}")
    print("| temperature | head lr | learned T | held-out before | held-out after | train (last 100) | T at end |")
    print("|---|---|---|---|---|---|---|")
    for t, lr, learn in itertools.product(args.temperatures, args.lrs, [False, True]):
        t0 = time.perf_counter()
        before, after, train, t_end = train_head(users, items, train_pairs, val_pairs, p.dim, p.batch_size, t, lr,
                                                 learn, args.steps, run.seed)
        print(f"| {t} | {lr:g} | {'yes' if learn else 'no'} | {before:.3f} | {after:.3f} | {train:.3f} | "
              f"{t_end:.3f} |  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
