"""Training throughput (next-item targets per second) of the sequential-recommendation LLMs.

For each model: real training batches of the chosen dataset, forward + backward + AdamW
step, a warm-up step, then the median over ``--steps`` steps. The models are measured one
after the other in one process so the figures are comparable.

    python experiments/bench_throughput.py --models llama_tiny smollm2_135m --steps 5 dataset=ml_100k
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from recsys_compress.tasks.config import validate
from recsys_compress.models.item_llm import count_parameters
from recsys_compress.tasks.builders import build_datamodule, build_lit_module, build_model
from recsys_compress.tasks.compose import compose_config


def measure(model_name: str, batch_size: int, steps: int, overrides: list[str]) -> dict:
    cfg = compose_config([f"model={model_name}", f"dataset.batch_size={batch_size}", *overrides])
    run = validate(cfg)
    dm = build_datamodule(run.dataset, run.seed)
    torch.manual_seed(run.seed)
    lit = build_lit_module(run, build_model(run.model, dm, cfg.paths.cache_dir)).train()
    lit.log = lambda *a, **k: None  # type: ignore[method-assign]
    optimizer = torch.optim.AdamW(lit.parameters(), lr=run.model.optim.lr)
    loader = iter(dm.train_dataloader())
    times, tokens = [], []
    for step in range(steps + 1):
        batch = next(loader)
        t0 = time.perf_counter()
        loss = lit.training_step(batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # step 0 warms up
            times.append(time.perf_counter() - t0)
            tokens.append(int(batch["attention_mask"][:, :-1].sum()))
    return {
        "model": model_name,
        "dataset": run.dataset.name,
        "params": count_parameters(lit.model),
        "batch_size": batch_size,
        "max_len": run.dataset.max_len,
        "median_step_s": statistics.median(times),
        "tokens_per_s": sum(tokens) / sum(times),
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama_tiny", "smollm2_135m"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 16],
                        help="one per model (the 135M model needs smaller batches on CPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=ml_100k")
    args = parser.parse_args()
    results = [
        measure(m, b, args.steps, args.overrides or ["dataset=ml_100k"])
        for m, b in zip(args.models, args.batch_sizes, strict=True)
    ]
    results.append({"torch_threads": torch.get_num_threads()})
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
