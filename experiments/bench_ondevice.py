"""On-device figures: base vs compressed vs compressed+int8, side by side in one run.

For each variant (base, odllm at each ratio and rank alignment, each of those + int8): batch-1
next-item latency (median over ``--reps`` calls, history length ``--length``), throughput at
``--batch`` sequences (median over as many calls), peak RSS, and the file size. Ratios to the
base are computed per round and summarised over ``--rounds`` (5) as the median ratio, its
quartiles and a 95% bootstrap interval of the median (``paired_median_ratio``): machine load
that hits one round hits both sides of its ratios. Every thread pool is pinned to ``--threads``.

    python experiments/bench_ondevice.py --model llama_tiny --ratios 0.3 0.5 0.7 dataset=ml_100k
    python experiments/bench_ondevice.py --runtime onnx --model smollm2_135m --ratios 0.5 --rank-aligns 1 32 dataset=ml_100k
    python experiments/bench_ondevice.py --device cuda --model smollm2_135m --ratios 0.5 dataset=ml_1m  # GPU, float only

``--runtime torch`` (default): eager PyTorch; each variant is built and timed in a fresh
subprocess per round, the variants' order rotated round by round.

``--runtime onnx`` measures the deployable artefact: each variant is exported once
(``recsys_compress.deploy.export``; +int8 = onnxruntime dynamic int8 on the graph, weight scales
per output channel; with ``--int8 dynamic static`` also +int8static = static int8, QDQ with
activation scales fixed on the calibration batches; with ``--int8-weights per_channel per_tensor``
also +int8pt / +int8staticpt, one weight scale per matrix; with ``--int8-smooth none 0.75`` also
+int8s0.75, SmoothQuant scales folded into every block first, ``deploy.smoothing``); then each
round is one process (never importing torch) that loads every artefact with onnxruntime, on
one shared thread pool, and times them call by call in turn, the order rotated each call: a
change in the machine's load hits every variant alike. (Timed each in a process of its own,
one after the other, two invocations of the same command gave odllm@0.5 0.58x and 0.67x; with
a thread pool per session, an idle session's worker slowed the running one's matmuls.)
Peak RSS and file size come from a process per
artefact of its own, so they are what a device running that recommender needs.
``--rank-aligns 1 32`` adds variants whose ranks are multiples of 32 (``compression.rank_align``);
``--allocations uniform global_relative`` adds each compressed variant with each rank allocation
(``compression.allocation``; ``odllm@0.5:global_relative``), timed in the same rounds as its
uniform twin and paired with it;
``--export-dir DIR`` keeps the artefacts (``--reuse-exports`` measures them again) for
``experiments/profile_onnx.py``.

Latency does not depend on what the weights learned, so by default the base model is the
untrained architecture (pretrained weights for smollm2_135m); compression calibrates on real
batches. ``--base-run RUN_DIR`` starts instead from a finished ``train.py`` run's trained model
(its own command line composed, as ``compression_table.py`` does; ``--model`` then comes from
the run), and ``--test`` (onnx runtime) also ranks the test users with every artefact as
shipped (``recsys_compress.deploy.evaluate``): NDCG@10 under both protocols and its retention
of the base artefact's, with the 95% paired bootstrap interval over users. That is the
quality a device running the artefact gets, int8 by onnxruntime included:

    python experiments/bench_ondevice.py --runtime onnx --base-run RUN_DIR --test --ratios 0.5 --rounds 5 \
        --reps 30 --batch 8 --calib-batches 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from recsys_compress.utils.cli import parse_with_overrides

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def artefact_dir(root: str | Path, variant: str) -> Path:
    """Where a variant's artefact is exported: ``odllm@0.5/a32:global`` -> ``ROOT/odllm@0.5_a32_global``."""
    return Path(root) / variant.replace("/", "_").replace(":", "_")


UNIFORM = "uniform"  # the allocation a variant name leaves unsaid


class Int8(NamedTuple):
    """How a variant's int8 artefact is exported (``export_onnx``'s int8, int8_weights, int8_smooth)."""
    mode: str = "dynamic"
    weights: str = "per_channel"
    smooth: float | None = None  # SmoothQuant's alpha, or None: no smoothing

    @property
    def suffix(self) -> str:
        """``+int8[static][pt][sALPHA]``: static activation scales, one weight scale per matrix
        ("pt", per tensor), SmoothQuant at ALPHA; bare ``+int8`` is dynamic, per channel, unsmoothed."""
        return ("+int8" + ("static" if self.mode == "static" else "") + ("pt" if self.weights == "per_tensor" else "")
                + (f"s{self.smooth:g}" if self.smooth is not None else ""))


INT8_SUFFIX = re.compile(r"\+int8(static)?(pt)?(?:s(\d*\.?\d+))?")


def smooth_alpha(text: str) -> float | None:
    """``--int8-smooth``'s values: ``none`` (no smoothing) or an alpha from 0 to 1."""
    if text.lower() in ("none", "null"):
        return None
    alpha = float(text)
    if not 0 <= alpha <= 1:
        raise argparse.ArgumentTypeError(f"{text}: allowed: none or 0 to 1")
    return alpha


def parse_variant(variant: str) -> tuple[str, Int8 | None, float, int, str]:
    """``METHOD[+int8[static][pt][sALPHA]]@RATIO[/aN][:ALLOCATION]`` (or ``base[+int8...]``) ->
    (method, its ``Int8`` or None, ratio, rank_align, allocation)."""
    name, _, allocation = variant.partition(":")
    method, _, rest = name.partition("@")
    ratio, _, align = rest.partition("/a")
    method, plus, suffix = method.partition("+")
    int8 = None
    if plus:
        match = INT8_SUFFIX.fullmatch(plus + suffix)
        if not match:
            raise ValueError(f"variant {variant!r}: unknown suffix +{suffix}; allowed: "
                             "+int8[static][pt][sALPHA], e.g. +int8, +int8pt, +int8static, +int8s0.75")
        static, per_tensor, alpha = match.groups()
        int8 = Int8("static" if static else "dynamic", "per_tensor" if per_tensor else "per_channel",
                    float(alpha) if alpha else None)
    return method, int8, float(ratio or 1.0), int(align or 1), allocation or UNIFORM


def variant_name(method: str, int8: Int8 | None, ratio: float | None = None, align: int = 1,
                 allocation: str = UNIFORM) -> str:
    """The inverse of ``parse_variant``. The base has no ratio: one given for it is dropped."""
    name = method + (Int8(*int8).suffix if int8 else "")
    if ratio is not None and method != "base":
        name += f"@{ratio}" + (f"/a{align}" if align > 1 else "")
    return name + (f":{allocation}" if allocation != UNIFORM else "")


def compose_run(args: argparse.Namespace):
    """The composed and validated config: ``--base-run``'s own command line, or ``model=--model``,
    then the overrides given here."""
    from recsys_compress.tasks.config import validate
    from recsys_compress.tasks.trained_run import run_overrides
    from recsys_compress.tasks.compose import compose_config

    first = run_overrides(args.base_run) if args.base_run else [f"model={args.model}"]
    cfg = compose_config([*first, *args.overrides])
    return cfg, validate(cfg)


def build_base(args: argparse.Namespace):
    """The validated run config, datamodule and base model (``--base-run``'s trained weights, or
    the architecture of ``--model`` untrained / pretrained)."""
    import torch

    from recsys_compress.tasks.builders import build_datamodule, build_lit_module, build_model
    from recsys_compress.tasks.trained_run import load_trained_base

    cfg, run = compose_run(args)
    dm = build_datamodule(run.dataset, run.seed)
    torch.manual_seed(0)
    lit = build_lit_module(run, build_model(run.model, dm, cfg.paths.cache_dir))
    if args.base_run:
        load_trained_base(args.base_run, lit, cfg.paths.cache_dir, run)
    return run, dm, lit


def quality_worker(args: argparse.Namespace) -> dict:
    """Every artefact of ``--test-artefacts`` ranks the test users (the run's evaluation
    protocol, both ways); quality does not depend on the process, so one process tests all.
    Each int8 artefact whose float twin is among them is also compared with it user by user
    (``agreement``, on the scores the ranking computed): the error int8 alone adds, which
    NDCG@10 on a thousand users cannot resolve."""
    from recsys_compress.tasks.builders import build_datamodule
    from recsys_compress.deploy.evaluate import evaluate_artefact

    _, run = compose_run(args)
    e = run.evaluation
    dm = build_datamodule(run.dataset, run.seed)
    names = args.test_artefacts.split(",")
    out, scores = {}, {}
    for v in names:
        scores[v] = []
        values, per_user = evaluate_artefact(artefact_dir(args.folder, v), dm.test_dataloader(), e.exclude_seen,
                                             tuple(e.hr_ks), tuple(e.ndcg_ks), threads=args.threads, scores=scores[v])
        out[v] = {"test": values, "per_user": per_user.tolist()}
    for v in names:
        method, int8, ratio, align, allocation = parse_variant(v)
        twin = variant_name(method, None, ratio, align, allocation)
        if int8 and twin in names:
            out[v]["agreement"] = agreement(scores[twin], scores[v])
    return out


AGREEMENT_K = 10


def agreement(reference: list, other: list) -> dict[str, list[float]]:
    """Per user, how far ``other``'s scores are from ``reference``'s (the same model before int8;
    both: per batch, users x item indices): ``score_error`` = |s_other - s_ref| / |s_ref -
    mean(s_ref)| over the items (a constant offset ranks nothing), and ``top_k_overlap`` = the
    share of the reference's top-``AGREEMENT_K`` items that ``other`` also ranks there (seen
    items included: this compares two programs)."""
    import numpy as np

    error, overlap = [], []
    for ref, oth in zip(reference, other, strict=True):
        a, c = ref[:, 1:], oth[:, 1:]  # index 0: padding
        error += (np.linalg.norm(c - a, axis=1) / np.linalg.norm(a - a.mean(1, keepdims=True), axis=1)).tolist()
        top_a = np.argpartition(-a, AGREEMENT_K, 1)[:, :AGREEMENT_K]
        top_c = np.argpartition(-c, AGREEMENT_K, 1)[:, :AGREEMENT_K]
        overlap += [len(np.intersect1d(x, y)) / AGREEMENT_K for x, y in zip(top_a, top_c)]
    return {"score_error": error, "top_k_overlap": overlap}


def build_variant(args: argparse.Namespace, variant: str):
    """The model of ``variant`` (base, METHOD@R, with +int8), its datamodule and compression time."""
    import torch

    from recsys_compress.compression.compressor import Compressor

    torch.set_num_threads(args.threads)
    run, dm, lit = build_base(args)
    lit = lit.eval().to(args.device)
    method, quantize, ratio, align, allocation = parse_variant(variant)
    compress_s = 0.0
    if method != "base" or quantize:
        cb = Compressor(
            run.compression.replace(method="int8" if method == "base" else method, calib_batches=args.calib_batches,
                                    allocation=allocation,
                                    quantize="int8" if quantize else None, rank_align=align,
                                    heldout_batches=0),  # latency needs no held-out error
            ratio,
            defer_quantize=args.runtime == "onnx",  # onnxruntime quantises the exported graph
        )
        cb.compress(lit, dm.train_dataloader())
        compress_s = cb.seconds
    return lit, dm, compress_s, quantize


def export_worker(args: argparse.Namespace) -> dict:
    """Export ``--export=V[,V+int8,...]`` into ``--folder``/V: a float variant and its int8 twins
    share one compressed float model (onnxruntime quantises the exported graph), built once.
    Static int8 fixes its activation scales, and smoothing its channel scales, on the first
    ``--calib-batches`` training batches, the ones the compression calibrated on."""
    from itertools import islice

    from recsys_compress.deploy.export import export_onnx
    from recsys_compress.models.item_llm import count_parameters

    names = args.export.split(",")
    if len(int8_twins(names)) != 1:
        raise ValueError(f"--export={args.export}: one float variant and its int8 twins at most")
    method, _, ratio, align, allocation = parse_variant(names[0])
    lit, dm, compress_s, _ = build_variant(
        args, variant_name(method, None, ratio, align, allocation))
    out = {}
    for v in names:
        int8 = parse_variant(v)[1]
        info = {"variant": v, "params": count_parameters(lit.model), "compress_s": compress_s}
        calibrates = int8 is not None and (int8.mode == "static" or int8.smooth is not None)
        export_onnx(lit, artefact_dir(args.folder, v), max(args.length, dm.max_len), dm.data.item_ids,
                    dm.data.item_texts(), quantize="int8" if int8 else None, info=info, fuse=args.fuse,
                    **({"int8": int8.mode, "int8_weights": int8.weights, "int8_smooth": int8.smooth} if int8 else {}),
                    calibration=islice(dm.train_dataloader(), args.calib_batches) if calibrates else None)
        out[v] = info
    return out


def exported_as(meta: dict, variant: str) -> bool:
    """Whether the artefact whose ``deploy.json`` is ``meta`` is ``variant``'s export: its int8
    mode, weight scales, smoothing and weight bits (artefacts from before ``int8_weights`` were per
    matrix, and say nothing; those from before ``int8_smooth`` were not smoothed; those from before
    ``int8_weight_bits`` may hold 8-bit weights, which saturate on CPUs without VNNI)."""
    from recsys_compress.deploy.export import INT8_WEIGHT_BITS

    int8 = parse_variant(variant)[1]
    expected = (*int8, INT8_WEIGHT_BITS) if int8 else (None,) * 4
    return (meta.get("int8"), meta.get("int8_weights"), meta.get("int8_smooth"), meta.get("int8_weight_bits")) == expected


def int8_twins(variants: list[str]) -> list[list[str]]:
    """The variants grouped by the float model they export: ``[[V, V+int8, V+int8pt, ...], ...]``."""
    groups: dict[tuple, list[str]] = {}
    for v in variants:
        method, _, ratio, align, allocation = parse_variant(v)
        groups.setdefault((method, ratio, align, allocation), []).append(v)
    return list(groups.values())


def time_recommenders(recs: dict, length: int, batch: int, reps: int) -> dict[str, dict]:
    """Batch-1 latency (median of ``reps`` calls) and throughput at ``batch`` of each artefact,
    interleaved call by call (the order rotated each call), so that a change in the machine's
    load within the round hits every variant alike."""
    import numpy as np

    first = next(iter(recs.values()))
    rng = np.random.default_rng(0)
    history = [first.item_ids[i] for i in rng.integers(0, len(first.item_ids), length)]
    names = list(recs)
    times: dict[str, dict[int, list[float]]] = {v: {1: [], batch: []} for v in names}
    for size in (1, batch):
        for rec in recs.values():  # warm-up: onnxruntime plans memory and packs weights on the first calls
            for _ in range(5):
                rec.scores([history] * size)
        for i in range(reps):
            for v in names[i % len(names):] + names[: i % len(names)]:
                t0 = time.perf_counter()
                recs[v].scores([history] * size)
                times[v][size].append(time.perf_counter() - t0)
    return {v: {"latency_ms": 1000 * statistics.median(times[v][1]),
                "throughput_seq_s": batch / statistics.median(times[v][batch])} for v in names}


def onnx_round_worker(args: argparse.Namespace) -> dict:
    """One round: every variant's artefact loaded in this process and timed call by call in
    turn (``time_recommenders``). The sessions share one thread pool: with a pool each, an idle
    session's worker takes a core from the running one, which left variants bimodal from round
    to round. This process never imports torch."""
    from recsys_compress.deploy.recommend import Recommender, share_one_thread_pool

    share_one_thread_pool(args.threads)
    variants = args.variants.split(",")
    k = args.time_round % len(variants)
    recs = {v: Recommender(artefact_dir(args.folder, v)) for v in variants[k:] + variants[:k]}
    out = time_recommenders(recs, args.length, args.batch, args.reps)
    assert "torch" not in sys.modules
    return out


def onnx_worker(args: argparse.Namespace) -> dict:
    """Peak RSS and file size of one artefact in a process of its own (no torch imported)."""
    from recsys_compress.deploy.recommend import Recommender

    rec = Recommender(args.folder, threads=args.threads)
    time_recommenders({args.folder: rec}, args.length, args.batch, 5)  # RSS after running, as a device would
    assert "torch" not in sys.modules
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "file_mb": (Path(args.folder) / "model.onnx").stat().st_size / 2**20,
    }


def worker(args: argparse.Namespace) -> dict:
    import torch
    from recsys_compress.models.item_llm import count_parameters, serialized_megabytes

    lit, dm, compress_s, _ = build_variant(args, args.worker)
    device = torch.device(args.device)

    def wait() -> None:  # CUDA kernels run asynchronously: time them to completion
        if device.type == "cuda":
            torch.cuda.synchronize()

    history = torch.randint(1, dm.n_items + 1, (1, args.length), device=device)
    one = torch.ones_like(history)
    batch = history.expand(args.batch, -1).contiguous()
    ones = torch.ones_like(batch)
    with torch.inference_mode():
        for _ in range(5):
            lit(history, one)
        times = []
        for _ in range(args.reps):
            wait()
            t0 = time.perf_counter()
            lit(history, one)
            wait()
            times.append(time.perf_counter() - t0)
        lit(batch, ones)
        batch_times = []
        for _ in range(args.reps):  # as many as batch-1 calls, as in time_recommenders
            wait()
            t0 = time.perf_counter()
            lit(batch, ones)
            wait()
            batch_times.append(time.perf_counter() - t0)
    return {
        "variant": args.worker,
        "latency_ms": 1000 * statistics.median(times),
        "throughput_seq_s": args.batch / statistics.median(batch_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "file_mb": serialized_megabytes(lit.model),
        "params": count_parameters(lit.model),
        "compress_s": compress_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the architecture without --base-run (default llama_tiny)")
    parser.add_argument("--base-run", type=Path, default=None,
                        help="start from this finished train.py run's trained model (its config composed)")
    parser.add_argument("--test", action="store_true",
                        help="onnx: rank the test users with every artefact (NDCG@10, retention of the base's)")
    parser.add_argument("--method", default="odllm")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--rank-aligns", nargs="+", type=int, default=[1],
                        help="compressed variants with ranks aligned to each multiple (compression.rank_align)")
    parser.add_argument("--allocations", nargs="+", default=[UNIFORM],
                        help="each compressed variant with each rank allocation (compression.allocation)")
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--int8", nargs="+", default=["dynamic"],
                        help="the int8 twin of every variant in each mode (onnx: static adds +int8static "
                             "variants, activation scales fixed on the calibration batches)")
    parser.add_argument("--int8-weights", nargs="+", default=["per_channel"],
                        help="onnx: each int8 twin with each kind of weight scales (per_tensor adds the "
                             "+int8pt/+int8staticpt variants: one scale per matrix)")
    parser.add_argument("--int8-smooth", nargs="+", type=smooth_alpha, default=None,
                        help="onnx: each int8 twin with each SmoothQuant alpha, or none (0.75: the "
                             "+int8s0.75 variants; deploy.smoothing); default: the config's export.int8_smooth")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--runtime", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--device", default="cpu", help="torch runtime: cpu or cuda (int8 variants are CPU-only)")
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                        help="onnx: export with onnxruntime's fused operators (deploy.fusions.fuse_for_onnxruntime)")
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="onnx: keep each variant's artefact in DIR/VARIANT (default: a temporary folder)")
    parser.add_argument("--reuse-exports", action="store_true",
                        help="onnx: measure the artefacts already in --export-dir instead of exporting again")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--export", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--time-round", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--test-artefacts", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=ml_100k")
    args, overrides = parse_with_overrides(parser, sys.argv[1:])  # `--ratios 0.5 dataset=x` would swallow them
    args.overrides = overrides
    if args.base_run and args.model:
        parser.error("--model comes from --base-run's config; give one of them")
    args.model = args.model or (None if args.base_run else "llama_tiny")
    if args.test_artefacts:
        print(json.dumps(quality_worker(args)))
        return
    if args.export:
        print(json.dumps(export_worker(args)))
        return
    if args.time_round is not None:
        print(json.dumps(onnx_round_worker(args)))
        return
    if args.worker:
        print(json.dumps(onnx_worker(args) if args.runtime == "onnx" else worker(args)))
        return

    if args.reuse_exports and not args.export_dir:
        parser.error("--reuse-exports needs --export-dir")
    if args.test and args.runtime != "onnx":
        parser.error("--test ranks the test users with the exported artefacts: it needs --runtime onnx")
    if args.device != "cpu" and args.runtime != "torch":
        parser.error(f"--device={args.device} applies to --runtime torch; onnx runs on the CPU")
    from recsys_compress.compression.allocation import ALLOCATIONS  # here: the workers stay torch-free
    from recsys_compress.deploy.export import INT8_MODES, INT8_WEIGHTS

    for flag, values, allowed in (("--allocations", args.allocations, ALLOCATIONS), ("--int8", args.int8, INT8_MODES),
                                  ("--int8-weights", args.int8_weights, INT8_WEIGHTS)):
        for value in values:
            if value not in allowed:
                parser.error(f"{flag} {value}; allowed: {', '.join(allowed)}")
    if "static" in args.int8 and args.runtime != "onnx":
        parser.error("--int8 static quantises the exported graph: it needs --runtime onnx")
    if args.int8_weights != ["per_channel"] and args.runtime != "onnx":
        parser.error("--int8-weights sets the exported graph's int8 weight scales: it needs --runtime onnx")
    if args.int8_smooth is None:  # what train.py would ship
        args.int8_smooth = [compose_run(args)[1].export.int8_smooth if args.runtime == "onnx" else None]
    if args.int8_smooth != [None] and args.runtime != "onnx":
        parser.error("--int8-smooth prepares the exported graph for int8: it needs --runtime onnx")
    # int8 (torch.ao and onnxruntime) runs on CPUs only
    int8s = [None, *(Int8(m, w, a) for m in args.int8 for w in args.int8_weights for a in args.int8_smooth)] \
        if args.device == "cpu" else [None]
    variants = [variant_name("base", q) for q in int8s]
    for r in args.ratios:
        for a in args.rank_aligns:
            for allocation in args.allocations:
                variants += [variant_name(args.method, q, r, a, allocation) for q in int8s]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    passthrough = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                   ("model", "base-run", "length", "batch", "reps", "threads", "calib-batches", "runtime", "device")
                   if getattr(args, k.replace('-', '_')) is not None]
    passthrough.append("--fuse" if args.fuse else "--no-fuse")

    # Every library's thread pool pinned to --threads, so no variant gets more cores than another.
    env = {**os.environ, **{k: str(args.threads) for k in THREAD_VARIABLES}}

    def call(*extra: str) -> dict:
        out = subprocess.run([sys.executable, __file__, *passthrough, *extra, *args.overrides],
                             capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(f"{' '.join(extra)} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.export_dir or scratch
        exported = {}
        if args.runtime == "onnx":
            todo = []
            for v in variants:
                kept = artefact_dir(tmp, v) / "deploy.json"
                meta = json.loads(kept.read_text()) if args.reuse_exports and kept.is_file() else None
                if meta is not None and exported_as(meta, v):
                    exported[v] = {k: meta[k] for k in ("params", "compress_s")}
                    print(f"{v}: reusing the artefact in {kept.parent}", file=sys.stderr)
                else:
                    todo.append(v)
            for twins in int8_twins(todo):  # compressed once, exported float and int8
                exported.update(call(f"--export={','.join(twins)}", f"--folder={tmp}"))
            alone = {v: call(f"--worker={v}", f"--folder={artefact_dir(tmp, v)}") for v in variants}
        quality = call(f"--test-artefacts={','.join(variants)}", f"--folder={tmp}") if args.test else {}
        for k in range(args.rounds):
            if args.runtime == "onnx":
                timed = call(f"--time-round={k}", f"--folder={tmp}", f"--variants={','.join(variants)}")
                for v in variants:
                    results[v].append({**exported[v], **alone[v], **timed[v]})
                continue
            # rotated each round, so no variant always runs first (or right after the same one)
            for v in variants[k % len(variants):] + variants[: k % len(variants)]:
                results[v].append(call(f"--worker={v}"))
    rows = summarize(results, "base")
    print(f"{args.base_run or args.model} ({args.runtime}), {'/'.join(args.allocations)} allocation, history {args.length}, batch {args.batch}, "
          f"{args.threads} threads, "
          f"{args.rounds} rounds x {args.reps} calls; x base: median of the per-round ratios "
          f"[quartiles] (95% bootstrap interval of the median)")
    print("| variant | latency ms | x base | seq/s @batch | x base | peak RSS MB | file MB | x base | params |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['latency_ms']:.2f} | {_ratio_text(r['latency_x_base'])} | "
              f"{r['throughput_seq_s']:.1f} | {_ratio_text(r['throughput_x_base'])} | {r['peak_rss_mb']:.0f} | "
              f"{r['file_mb']:.2f} | {r['file_x_base']:.2f} | {r['params']:,} |")
    pairs = pairwise(results)
    if pairs:
        print("\nlatency ratios of related variants, paired by round (median [quartiles] (95% interval)):")
        for p in pairs:
            print(f"- {p['variant']} / {p['reference']}: {_ratio_text(p['latency'])}")
    quality_table = quality_rows(quality, "base")
    if quality_table:
        print("\neach artefact on the test users (retention of the base artefact's NDCG@10 [95% paired bootstrap "
              "interval over users]):")
        print(f"| variant | NDCG@10 | retention | NDCG@10, seen kept | HR@10 | score error vs float twin | "
              f"top-{AGREEMENT_K} overlap with it |")
        print("|---|---|---|---|---|---|---|")
        for q in quality_table:
            twin = (f"{q['score_error']:.4f} | {q['top_k_overlap']:.3f}" if "score_error" in q else "- | -")
            print(f"| {q['variant']} | {q['ndcg@10']:.4f} | {q['retention']:.3f} [{q['retention_ci_low']:.3f}, "
                  f"{q['retention_ci_high']:.3f}] | {q['seen_kept/ndcg@10']:.4f} | {q['hr@10']:.4f} | {twin} |")
    error_pairs = score_error_pairs(quality)
    if error_pairs:
        print("\nscore error against the int8 twin one setting away (per output channel / per matrix, smoothed / "
              "not; mean over users [95% paired bootstrap interval]):")
        for p in error_pairs:
            print(f"- {p['variant']} / {p['reference']}: {p['score_error_ratio']:.3f} [{p['low']:.3f}, {p['high']:.3f}]")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": sys.argv, "rows": rows, "pairs": pairs, "rounds": results,
                                        "quality": quality_table,
                                        "score_error_pairs": error_pairs}, indent=2) + "\n")


def quality_rows(quality: dict[str, dict], base: str) -> list[dict]:
    """Per variant: its test metrics and the retention of ``base``'s NDCG@10, with the paired
    bootstrap interval over the same users."""
    import torch

    from recsys_compress.evaluation.bootstrap import retention

    if not quality:
        return []
    reference = torch.tensor(quality[base]["per_user"], dtype=torch.float64)
    rows = []
    for v, q in quality.items():
        rows.append({"variant": v, **q["test"], **retention(
            quality[base]["test"]["ndcg@10"], q["test"]["ndcg@10"], reference,
            torch.tensor(q["per_user"], dtype=torch.float64), key="retention")})
        if "agreement" in q:  # against the float twin
            rows[-1].update({k: statistics.fmean(values) for k, values in q["agreement"].items()})
    return rows


def score_error_pairs(quality: dict[str, dict]) -> list[dict]:
    """Each int8 artefact against the int8 twin it differs from by one setting: weight scales
    per output channel against one scale per matrix, smoothed against unsmoothed. The ratio of
    their mean score errors (from the same float twin, on the same users) and its 95% paired
    bootstrap interval over users."""
    import torch

    from recsys_compress.evaluation.bootstrap import paired_bootstrap_ratio

    pairs = []
    for v, q in quality.items():
        method, int8, ratio, align, allocation = parse_variant(v)
        if not int8 or "agreement" not in q:
            continue
        references = []
        if int8.weights == "per_channel":
            references.append(int8._replace(weights="per_tensor"))
        if int8.smooth is not None:
            references.append(int8._replace(smooth=None))
        for reference in references:
            ref = variant_name(method, reference, ratio, align, allocation)
            if "agreement" not in quality.get(ref, {}):
                continue
            before, after = (torch.tensor(quality[x]["agreement"]["score_error"], dtype=torch.float64)
                             for x in (ref, v))
            low, high = paired_bootstrap_ratio(before, after)
            pairs.append({"variant": v, "reference": ref, "score_error_ratio": float(after.mean() / before.mean()),
                          "low": low, "high": high})
    return pairs


def pairwise(results: dict[str, list[dict]]) -> list[dict]:
    """Each compressed+int8 variant against int8 alone (do the size and latency levers
    compose?), each aligned variant against its unaligned twin and each non-uniform allocation
    against its uniform twin, paired by round."""
    from recsys_compress.evaluation.bootstrap import paired_median_ratio

    pairs = []
    for v in results:
        method, int8, ratio, align, allocation = parse_variant(v)
        references = [variant_name("base", int8)] if int8 and method != "base" else []
        if int8 and int8.mode == "static":  # do fixed activation scales beat per-call ones?
            references.append(variant_name(method, int8._replace(mode="dynamic"), ratio, align, allocation))
        if int8 and int8.weights == "per_tensor":  # what do scales per output channel cost?
            references.append(variant_name(method, int8._replace(weights="per_channel"), ratio, align, allocation))
        if int8 and int8.smooth is not None:  # smoothing changes weights only: it should cost nothing
            references.append(variant_name(method, int8._replace(smooth=None), ratio, align, allocation))
        if align > 1:
            references.append(variant_name(method, int8, ratio, 1, allocation))
        if allocation != UNIFORM:
            references.append(variant_name(method, int8, ratio, align))
        for ref in references:
            if ref in results:
                pairs.append({"variant": v, "reference": ref, "latency": paired_median_ratio(
                    [r["latency_ms"] for r in results[ref]], [r["latency_ms"] for r in results[v]])})
    return pairs


def summarize(results: dict[str, list[dict]], base: str) -> list[dict]:
    """One row per variant: medians over rounds, and latency/throughput ratios to ``base``
    paired by round (``paired_median_ratio``: median, quartiles, bootstrap interval)."""
    from recsys_compress.evaluation.bootstrap import paired_median_ratio

    rows = []
    base_file = statistics.median(r["file_mb"] for r in results[base])
    for v, rounds in results.items():
        row = {"variant": v, "params": rounds[0]["params"]}  # fixed by the variant, not measured
        for k in ("latency_ms", "throughput_seq_s", "peak_rss_mb", "file_mb", "compress_s"):
            row[k] = statistics.median(r[k] for r in rounds)
        for k, name in (("latency_ms", "latency_x_base"), ("throughput_seq_s", "throughput_x_base")):
            row[name] = paired_median_ratio([r[k] for r in results[base]], [r[k] for r in rounds])
        row["file_x_base"] = row["file_mb"] / base_file
        rows.append(row)
    return rows


def _ratio_text(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} [{s['q1']:.2f}, {s['q3']:.2f}] ({s['low']:.2f}-{s['high']:.2f})"


if __name__ == "__main__":
    main()
