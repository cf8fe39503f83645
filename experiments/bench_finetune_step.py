"""Seconds per SmolLM2-135M training step: full fine-tuning vs LoRA, float32 vs bfloat16 autocast.

    python3 experiments/bench_finetune_step.py                     # batch 8 x 50 items, 5 steps each
    python3 experiments/bench_finetune_step.py --batch 8 --length 50 --steps 5 --n-items 1682

One step is what ``SeqRecLitModule.training_step`` does (the decoder over the item sequence,
the tied item head, cross-entropy at every position) plus backward and AdamW. Item ids are
random: speed does not depend on them. The first step of each variant is a warm-up and is not
counted; the figure is the median of the rest (forward, backward, optimiser, total).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from recsys_compress.models.config import LoraSettings
from recsys_compress.models.finetune import add_lora
from recsys_compress.models.gguf_cache import convert_gguf
from recsys_compress.models.item_llm import load_item_llm

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def time_steps(model, ids: torch.Tensor, steps: int, bf16: bool) -> tuple[float, float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    head = model.get_output_embeddings()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model.model(input_ids=ids[:, :-1]).last_hidden_state
            logits = head(hidden.reshape(-1, hidden.shape[-1]))
        loss = F.cross_entropy(logits.float(), ids[:, 1:].reshape(-1))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        times.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return tuple(statistics.median(part) for part in zip(*times[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--n-items", type=int, default=1682)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "models")
    args = parser.parse_args(argv)
    folder = convert_gguf(GGUF, args.cache)
    torch.manual_seed(0)
    ids = torch.randint(1, args.n_items + 1, (args.batch, args.length + 1))
    print(f"threads {torch.get_num_threads()}, batch {args.batch} x {args.length} items")
    print("| variant | forward s | backward s | optimiser s | step s |\n|---|---|---|---|---|")
    for finetune in ("full", "lora"):
        for bf16 in (False, True):
            model = load_item_llm(folder, args.n_items, item_init="random")
            if finetune == "lora":
                add_lora(model, LoraSettings(r=args.lora_r, alpha=2.0 * args.lora_r, dropout=0.05))  # all 7 linears
            f, b, o = time_steps(model, ids, args.steps, bf16)
            print(f"| {finetune} {'bf16-mixed' if bf16 else 'float32'} | {f:.2f} | {b:.2f} | {o:.2f} | {f + b + o:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
