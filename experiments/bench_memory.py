"""Peak memory of compression vs model depth: whole-model vs sequential (compression.sequential).

A randomly initialised LLaMA of width 1024 (intermediate 2752, the LLaMA-7B proportions) with
4, 8 and 16 blocks is compressed with odllm at 0.5 on the same calibration tokens. Each
(mode, depth) runs in its own process; the figure is the peak RSS during compression above the
RSS once the model and the batches exist ("overhead": statistics, activations, workspace).

    python experiments/bench_memory.py --depths 4 8 16 --out BENCH_memory.json

Prints a markdown table; ``--out`` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

WIDTH, INTERMEDIATE, HEADS, ITEMS = 1024, 2752, 8, 2000


def measure(mode: str, depth: int, batches: int, heldout: int, batch_size: int, length: int) -> dict:
    import torch

    from recsys_compress.compression.compressor import Compressor
    from recsys_compress.compression.config import CompressionConfig
    from recsys_compress.models.item_llm import build_llama, count_parameters
    from recsys_compress.models.lit_seqrec import SeqRecLitModule
    from recsys_compress.utils.memory import resident_mib

    torch.manual_seed(0)
    torch.set_num_threads(1)
    lit = SeqRecLitModule(build_llama(ITEMS, hidden_size=WIDTH, num_layers=depth, num_heads=HEADS,
                                      intermediate_size=INTERMEDIATE, max_len=length)).eval()
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, ITEMS + 1, (batch_size, length), generator=generator),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
             "user": torch.arange(i * batch_size, (i + 1) * batch_size)} for i in range(batches + heldout)]
    params = count_parameters(lit.model)
    rss_before = resident_mib()
    config = CompressionConfig(method="odllm", calib_batches=batches, heldout_batches=heldout,
                               sequential=mode == "sequential")
    compressor = Compressor(config, 0.5)
    t0 = time.perf_counter()
    compressor.compress(lit, data)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mib()
    summary = compressor.summary()
    return {"mode": mode, "blocks": depth, "params": params, "weights_mib": params * 4 / 2**20,
            "rss_before_mib": rss_before, "peak_rss_mib": peak, "overhead_mib": peak - rss_before,
            "seconds": seconds, "calib_tokens": summary["compression/calib_tokens"],
            "heldout_rel_output_error": summary["compression/heldout_rel_output_error"]}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--modes", nargs="+", default=["whole", "sequential"], choices=["whole", "sequential"])
    parser.add_argument("--batches", type=int, default=8, help="calibration batches")
    parser.add_argument("--heldout", type=int, default=2, help="held-out batches")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "DEPTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.batches, args.heldout, args.batch_size, args.length)
    if args.one:  # the child: one measurement in a fresh process, so its peak RSS is its own
        print(json.dumps(measure(args.one[0], int(args.one[1]), *shape)))
        return
    rows = []
    for depth in args.depths:
        for mode in args.modes:
            child = subprocess.run([sys.executable, __file__, "--one", mode, str(depth), "--batches", str(args.batches),
                                    "--heldout", str(args.heldout), "--batch-size", str(args.batch_size),
                                    "--length", str(args.length)], capture_output=True, text=True, check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"# {rows[-1]}", flush=True)
    print("| blocks | mode | weights MiB | overhead MiB | overhead / block MiB | seconds | held-out error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['blocks']} | {r['mode']} | {r['weights_mib']:.0f} | {r['overhead_mib']:.0f} | "
              f"{r['overhead_mib'] / r['blocks']:.1f} | {r['seconds']:.1f} | {r['heldout_rel_output_error']:.4f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
