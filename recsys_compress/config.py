"""Typed, validated views of the Hydra config groups that our own code consumes.

Hydra composes YAML; these dataclasses check it before any work starts: unknown keys,
wrong types, values outside their allowed set or range all fail with the full key name
and what is allowed. Groups that configure third-party objects through ``_target_``
(trainer, logger, callbacks) are validated by those objects' own constructors.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r}: " + "; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return from_mapping(hint, value, key)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    return value


T = typing.TypeVar("T")


def from_mapping(cls: type[T], mapping: dict[str, Any], prefix: str) -> T:
    """Build dataclass ``cls`` from ``mapping``, rejecting unknown keys and bad values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}.{unknown[0]}; allowed keys in {prefix}: {', '.join(names)}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        if f.name not in mapping:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {key}")
            continue
        kwargs[f.name] = _check_type(mapping[f.name], hints[f.name], key)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(prefix)
    return obj


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range; allowed: {allowed}")


@dataclass
class DatasetConfig:
    name: str
    format: Literal["grouplens_csv", "recbole_atomic", "sequence_text"]
    path: str
    file_name: str | None = None  # RecBole NAME of NAME.inter; defaults to the folder name
    min_rating: float | None = None  # None: every rating is an interaction
    k_core: int = 0
    max_len: int = 50
    train_windows: Literal["recent", "all"] = "recent"
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0

    def check(self, p: str) -> None:
        _require(self.k_core >= 0, f"{p}.k_core", self.k_core, ">= 0 (0 or 1: off)")
        _require(self.max_len >= 1, f"{p}.max_len", self.max_len, ">= 1")
        _require(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, ">= 1")
        _require(self.eval_batch_size >= 1, f"{p}.eval_batch_size", self.eval_batch_size, ">= 1")
        _require(self.num_workers >= 0, f"{p}.num_workers", self.num_workers, ">= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    # Learning rate of the item table (input embeddings and a tied head). null: ``lr``. A
    # pretrained decoder wants a small rate, its new item vocabulary a large one.
    item_lr: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 0
    scheduler: Literal["constant", "cosine"] = "constant"

    def check(self, p: str) -> None:
        _require(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        if self.item_lr is not None:
            _require(self.item_lr > 0, f"{p}.item_lr", self.item_lr, "> 0 (or null: lr)")
        _require(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, ">= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{p}.betas",
                 self.betas, "two numbers in [0, 1)")
        _require(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, ">= 0")


# The linears of a LLaMA decoder block: what LoRA adapts by default.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """LoRA adapters (PEFT) on the decoder's linears; merged into the weights after training."""
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))

    def check(self, p: str) -> None:
        _require(self.r >= 1, f"{p}.r", self.r, ">= 1")
        _require(self.alpha > 0, f"{p}.alpha", self.alpha, "> 0")
        _require(0 <= self.dropout < 1, f"{p}.dropout", self.dropout, "[0, 1)")
        _require(len(self.target_modules) >= 1, f"{p}.target_modules", self.target_modules,
                 "at least one linear name (e.g. q_proj)")


@dataclass
class ModelConfig:
    name: str
    source: Literal["scratch", "pretrained"] = "scratch"
    # scratch LLaMA
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    dropout: float = 0.1
    tie_embeddings: bool = True
    # pretrained: a local Hugging Face folder, or a GGUF file converted once into the cache
    pretrained_path: str | None = None
    gguf_path: str | None = None
    item_init: Literal["text", "random"] = "text"
    embedding_dropout: float = 0.1
    # full: every weight trains. lora: the decoder is frozen and LoRA adapters train beside the
    # (always fully trained) item table; the adapters are merged after training, so the cached
    # base model, compression and export see a stock model.
    finetune: Literal["full", "lora"] = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self, p: str) -> None:
        for key in ("hidden_size", "num_layers", "num_heads"):
            _require(getattr(self, key) >= 1, f"{p}.{key}", getattr(self, key), ">= 1")
        _require(self.hidden_size % self.num_heads == 0, f"{p}.hidden_size", self.hidden_size,
                 f"a multiple of {p}.num_heads={self.num_heads}")
        if self.num_kv_heads is not None:
            _require(self.num_heads % self.num_kv_heads == 0, f"{p}.num_kv_heads",
                     self.num_kv_heads, f"a divisor of {p}.num_heads={self.num_heads}")
        for key in ("dropout", "embedding_dropout"):
            _require(0 <= getattr(self, key) < 1, f"{p}.{key}", getattr(self, key), "[0, 1)")
        if self.source == "pretrained" and not (self.pretrained_path or self.gguf_path):
            raise ConfigError(
                f"{p}.source=pretrained needs {p}.pretrained_path (a Hugging Face folder) "
                f"or {p}.gguf_path (a GGUF file)"
            )


@dataclass
class EvaluationConfig:
    exclude_seen: bool = True
    hr_ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20])
    ndcg_ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    popularity_baseline: bool = True

    def check(self, p: str) -> None:
        for key in ("hr_ks", "ndcg_ks"):
            ks = getattr(self, key)
            _require(bool(ks) and all(k >= 1 for k in ks), f"{p}.{key}", ks, "non-empty, each >= 1")
        # metrics.json promises these keys; a run without them would break reports.
        _require({1, 5, 10, 20} <= set(self.hr_ks), f"{p}.hr_ks", self.hr_ks, "must include 1, 5, 10, 20")
        _require({5, 10, 20} <= set(self.ndcg_ks), f"{p}.ndcg_ks", self.ndcg_ks, "must include 5, 10, 20")


@dataclass
class CompressionConfig:
    method: Literal["none", "svd", "asvd", "odllm", "prune_magnitude", "wanda", "int8"] = "none"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    calib_batches: int = 16
    heldout_batches: int = 4  # further batches, of users outside calibration: held-out output error
    asvd_alpha: float = 0.5
    quantize: Literal["int8"] | None = None  # stack int8 on a low-rank or pruned model
    gram_dtype: Literal["float32", "float64"] = "float64"  # per-batch x^T x; sums are always float64
    # ranks: one ratio per matrix, or one budget over all (compression/allocation.py)
    allocation: Literal["uniform", "global", "global_relative"] = "uniform"
    min_rank: int = 1  # global allocations: the least rank any matrix keeps

    def check(self, p: str) -> None:
        _require(self.min_rank >= 1, f"{p}.min_rank", self.min_rank, ">= 1")
        if self.allocation != "uniform" and self.method not in ("svd", "asvd", "odllm"):
            raise ConfigError(f"{p}.allocation={self.allocation} sets ranks: it applies to svd, asvd, odllm, "
                              f"not {p}.method={self.method}")
        _require(self.calib_batches >= 1, f"{p}.calib_batches", self.calib_batches, ">= 1")
        _require(self.heldout_batches >= 0, f"{p}.heldout_batches", self.heldout_batches, ">= 0 (0: no held-out error)")
        _require(self.asvd_alpha >= 0, f"{p}.asvd_alpha", self.asvd_alpha, ">= 0")
        if self.method != "none" and not self.include:
            raise ConfigError(f"{p}.include is empty: compression.method={self.method} needs layers to compress")


@dataclass
class AlignmentConfig:
    method: Literal["none", "progressive", "progressive_lstsq"] = "none"
    batches: int = 16            # training batches whose hidden states drive the alignment
    steps_per_layer: int = 100   # progressive: optimiser steps per decoder block
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: Literal["constant", "cosine"] = "cosine"  # restarts with every block
    warmup_steps: int = 0
    task_weight: float = 0.0     # + task_weight x next-item cross-entropy
    distill_weight: float = 0.0  # + distill_weight x T^2 KL(teacher || student logits)
    distill_temperature: float = 1.0
    ridge: float = 1e-4          # progressive_lstsq: Tikhonov term, relative to mean diag(ZZ^T)
    checkpoint: bool = True      # progressive: checkpoint after every block (resume support)

    def check(self, p: str) -> None:
        _require(self.batches >= 1, f"{p}.batches", self.batches, ">= 1")
        _require(self.steps_per_layer >= 1, f"{p}.steps_per_layer", self.steps_per_layer, ">= 1")
        _require(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        _require(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, ">= 0")
        _require(0 <= self.warmup_steps < self.steps_per_layer, f"{p}.warmup_steps", self.warmup_steps,
                 f"[0, steps_per_layer={self.steps_per_layer})")
        _require(self.task_weight >= 0, f"{p}.task_weight", self.task_weight, ">= 0")
        _require(self.distill_weight >= 0, f"{p}.distill_weight", self.distill_weight, ">= 0")
        _require(self.distill_temperature > 0, f"{p}.distill_temperature", self.distill_temperature, "> 0")
        _require(self.ridge >= 0, f"{p}.ridge", self.ridge, ">= 0")


@dataclass
class ExportConfig:
    save: bool = True   # the final compressed model as safetensors in RUN_DIR/model
    onnx: bool = False  # and as an ONNX artefact for `recsys-recommend` in RUN_DIR/onnx


@dataclass
class RunConfig:
    """The parts of the composed config that the training task reads directly."""

    seed: int
    dataset: DatasetConfig
    model: ModelConfig
    evaluation: EvaluationConfig
    compression: CompressionConfig
    ratio: float
    base_cache: bool
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    resume: str | None = None


# Top-level keys that the runner, Hydra's paths and Lightning read, besides the fields of the
# task configs below; together they are every top-level key a run may have.
_INFRASTRUCTURE_KEYS = ("task_name", "task", "paths", "trainer", "logger", "callbacks", "ckpt_path")


def _known_top_level_keys() -> list[str]:
    fields = {f.name for cls in (RunConfig, ProbeRunConfig, MARCRunConfig) for f in dataclasses.fields(cls)}
    return sorted(fields | {"probe", "marc", "representation", "ctr"} | set(_INFRASTRUCTURE_KEYS))


def _checked_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, after the checks every task shares.

    A ``???`` value left unset fails naming its key (it would otherwise travel on as the
    string "???", e.g. as a path); so does a top-level key that nothing reads (``+foo=1``).
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required key {missing[0]}: set it on the command line ({missing[0]}=...)"
                          + (f"; also unset: {', '.join(missing[1:])}" if missing[1:] else ""))
    known = _known_top_level_keys()
    unknown = sorted(set(cfg.keys()) - set(known))
    if unknown:
        raise ConfigError(f"unknown top-level key {unknown[0]} (nothing reads it: a typo, or a '+' too many?); "
                          f"allowed top-level keys: {', '.join(known)}")
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    _check_trainer(container)
    return container


def validate(cfg: DictConfig) -> RunConfig:
    """Validate the composed config; raises ``ConfigError`` naming the offending key."""
    container = _checked_container(cfg)
    for group in ("dataset", "model"):
        if group not in container:
            raise ConfigError(f"missing config group '{group}' (choose one with {group}=NAME)")
    return RunConfig(
        seed=_check_type(container.get("seed", 0), int, "seed"),
        dataset=from_mapping(DatasetConfig, container["dataset"], "dataset"),
        model=from_mapping(ModelConfig, container["model"], "model"),
        evaluation=from_mapping(EvaluationConfig, container.get("evaluation", {}), "evaluation"),
        compression=from_mapping(CompressionConfig, container.get("compression", {}), "compression"),
        ratio=_check_ratio(container.get("ratio", 1.0)),
        base_cache=_check_type(container.get("base_cache", True), bool, "base_cache"),
        alignment=_check_alignment(container),
        export=from_mapping(ExportConfig, container.get("export", {}), "export"),
        resume=_check_resume(container.get("resume")),
    )


def _check_trainer(container: dict[str, Any]) -> None:
    """Strategy/accelerator pairs Lightning would refuse deep inside Trainer(): fail at start."""
    trainer = container.get("trainer") or {}
    max_epochs = trainer.get("max_epochs")
    # 0 epochs would "succeed" with an untrained model's metrics; -1 is Lightning's "no limit".
    _require(max_epochs is None or max_epochs >= 1 or (max_epochs == -1 and trainer.get("max_time") is not None),
             "trainer.max_epochs", max_epochs, ">= 1, or -1 (no epoch limit) with trainer.max_time set")
    strategy, accelerator = str(trainer.get("strategy", "auto")), str(trainer.get("accelerator", "auto"))
    if strategy.startswith("fsdp"):
        import torch

        if accelerator == "cpu" or not torch.cuda.is_available():
            raise ConfigError(f"trainer.strategy={strategy} with trainer.accelerator={accelerator}: Lightning's FSDP "
                              "shards over CUDA GPUs and this machine has none; allowed here: trainer=ddp "
                              "(CPU processes on gloo), trainer=default or cpu")


def _check_resume(value: Any) -> str | None:
    if value is None or value == "auto":
        return value
    path = _check_type(value, str, "resume")
    if not Path(path).is_file():
        raise ConfigError(f"resume={path!r}: no such checkpoint file; allowed: null, auto, or a .ckpt path")
    return path


def _check_alignment(container: dict[str, Any]) -> AlignmentConfig:
    alignment = from_mapping(AlignmentConfig, container.get("alignment", {}), "alignment")
    method = container.get("compression", {}).get("method", "none")
    strategy = str((container.get("trainer") or {}).get("strategy", "auto"))
    if alignment.method == "progressive" and strategy.startswith(("ddp", "fsdp")):
        raise ConfigError(f"alignment=progressive with trainer.strategy={strategy} is not supported: "
                          "align on one device (trainer=default, cpu or gpu)")
    if alignment.method != "none" and method not in ("svd", "asvd", "odllm"):
        raise ConfigError(
            f"alignment={alignment.method} refines low-rank factors, but compression.method={method}; "
            "allowed with alignment: svd, asvd, odllm")
    return alignment


def _check_ratio(value: Any) -> float:
    ratio = _check_type(value, float, "ratio")
    _require(0 < ratio <= 1, "ratio", value, "(0, 1] (the fraction of targeted parameters kept)")
    return ratio


@dataclass
class ProbeConfig:
    layer: int | Literal["all"] = 15
    dim: int = 32
    compressor: Literal["linear", "pca", "none"] = "linear"

    def check(self, p: str) -> None:
        _require(self.dim >= 1, f"{p}.dim", self.dim, ">= 1")
        if self.layer != "all":
            _require(self.layer >= 0, f"{p}.layer", self.layer, "a layer index >= 0, or all")


@dataclass
class RepresentationConfig:
    model: Literal["smollm2_135m", "minilm", "llama_tiny", "hf"] = "smollm2_135m"
    path: str | None = None
    gguf_path: str | None = None
    template: str = "{title}. Genres: {genres}"
    batch_size: int = 64
    max_tokens: int = 64
    # User representations (task=mra_probe): the user's profile and most recent training-split
    # items as text, encoded like the items and fed to the CTR model as a second feature.
    users: bool = False
    user_template: str = "A viewer ({profile}) who recently rated: {history}"
    user_history: int = 10
    user_max_tokens: int = 160

    def check(self, p: str) -> None:
        _require(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, ">= 1")
        _require(self.max_tokens >= 1, f"{p}.max_tokens", self.max_tokens, ">= 1")
        _require(self.user_history >= 0, f"{p}.user_history", self.user_history, ">= 0")
        _require(self.user_max_tokens >= 1, f"{p}.user_max_tokens", self.user_max_tokens, ">= 1")
        try:
            self.user_template.format(profile="p", history="h", id="i")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"{p}.user_template={self.user_template!r} is not a valid template ({e}); "
                              "allowed fields: profile, history, id") from None
        if self.model == "hf" and not self.path:
            raise ConfigError(f"{p}.path is required with {p}.model=hf (a Hugging Face model folder)")
        try:
            self.template.format(title="t", year="y", genres="g", id="i")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"{p}.template={self.template!r} is not a valid template ({e}); "
                              "allowed fields: title, year, genres, id") from None


@dataclass
class CTRConfig:
    threshold: float = 4.0
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    split_by: Literal["time", "item"] = "time"
    id_dim: int = 16
    cross_layers: int = 2
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.1
    item_id_dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 2048
    eval_batch_size: int = 8192
    batch_by: Literal["sample", "item"] = "sample"
    items_per_batch: int = 32

    def check(self, p: str) -> None:
        _require(len(self.split) == 3 and min(self.split) >= 0 and abs(sum(self.split) - 1) < 1e-6,
                 f"{p}.split", self.split, "three non-negative fractions summing to 1 (train, val, test)")
        _require(self.split[1] > 0 and self.split[2] > 0, f"{p}.split", self.split, "non-empty val and test parts")
        _require(self.id_dim >= 1, f"{p}.id_dim", self.id_dim, ">= 1")
        _require(self.cross_layers >= 0, f"{p}.cross_layers", self.cross_layers, ">= 0")
        _require(0 <= self.dropout < 1, f"{p}.dropout", self.dropout, "[0, 1)")
        _require(0 <= self.item_id_dropout <= 1, f"{p}.item_id_dropout", self.item_id_dropout, "[0, 1]")
        _require(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        _require(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, ">= 0")
        _require(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, ">= 1")
        _require(self.eval_batch_size >= 1, f"{p}.eval_batch_size", self.eval_batch_size, ">= 1")
        _require(self.items_per_batch >= 1, f"{p}.items_per_batch", self.items_per_batch, ">= 1")


@dataclass
class ProbeRunConfig:
    seed: int
    dataset: DatasetConfig
    probe: ProbeConfig
    representation: RepresentationConfig
    ctr: CTRConfig


def _checked_ctr_container(cfg: DictConfig) -> dict[str, Any]:
    """``_checked_container`` for the CTR tasks, whose data must have ratings (checked first:
    a sequence file's unset path is beside the point)."""
    if OmegaConf.select(cfg, "dataset.format") == "sequence_text":
        raise ConfigError("dataset.format=sequence_text has no ratings; the CTR task needs "
                          "grouplens_csv or recbole_atomic (allowed datasets: ml_latest_small, ml_100k, ml_1m)")
    return _checked_container(cfg)


def _ctr_task_parts(container: dict[str, Any]) -> dict[str, Any]:
    """seed, dataset, representation and ctr: what both CTR tasks (probe, MARC) read."""
    if "dataset" not in container:
        raise ConfigError("missing config group 'dataset' (choose one with dataset=NAME)")
    dataset = from_mapping(DatasetConfig, container["dataset"], "dataset")
    return {
        "seed": _check_type(container.get("seed", 0), int, "seed"),
        "dataset": dataset,
        "representation": from_mapping(RepresentationConfig, container.get("representation", {}), "representation"),
        "ctr": from_mapping(CTRConfig, container.get("ctr", {}), "ctr"),
    }


def validate_probe(cfg: DictConfig) -> ProbeRunConfig:
    """Validate a ``task=mra_probe`` config; raises ``ConfigError`` naming the offending key."""
    container = _checked_ctr_container(cfg)
    run = ProbeRunConfig(probe=from_mapping(ProbeConfig, container.get("probe", {}), "probe"),
                         **_ctr_task_parts(container))
    if run.representation.users and run.probe.compressor == "none":
        raise ConfigError("representation.users=true needs representations; probe.compressor=none is the "
                          "ID-only baseline (allowed with users: linear, pca)")
    return run


@dataclass
class MARCConfig:
    dim: int = 32
    beta: float = 1e-3
    trainable_layers: int = 2
    finetune: Literal["full", "lora"] = "full"
    lora_r: int = 8
    constraint: Literal["none", "hsic"] = "none"
    hsic_weight: float = 0.1
    items_per_batch: int = 32
    lr: float = 1e-3
    llm_lr: float = 1e-4
    deploy_noise: bool = False
    export_dims: int | None = None

    def check(self, p: str) -> None:
        _require(self.dim >= 1, f"{p}.dim", self.dim, ">= 1")
        if self.export_dims is not None:
            _require(1 <= self.export_dims <= self.dim, f"{p}.export_dims", self.export_dims,
                     f"null (all) or 1..{p}.dim ({self.dim})")
        _require(self.beta >= 0, f"{p}.beta", self.beta, ">= 0")
        _require(self.trainable_layers >= 0, f"{p}.trainable_layers", self.trainable_layers, ">= 0 (0: frozen LLM)")
        _require(self.lora_r >= 1, f"{p}.lora_r", self.lora_r, ">= 1")
        _require(self.hsic_weight >= 0, f"{p}.hsic_weight", self.hsic_weight, ">= 0")
        _require(self.items_per_batch >= 1, f"{p}.items_per_batch", self.items_per_batch, ">= 1")
        _require(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        _require(self.llm_lr > 0, f"{p}.llm_lr", self.llm_lr, "> 0")


@dataclass
class MARCRunConfig:
    seed: int
    dataset: DatasetConfig
    marc: MARCConfig
    representation: RepresentationConfig
    ctr: CTRConfig


def validate_marc(cfg: DictConfig) -> MARCRunConfig:
    """Validate a ``task=marc`` config; raises ``ConfigError`` naming the offending key."""
    container = _checked_ctr_container(cfg)
    run = MARCRunConfig(marc=from_mapping(MARCConfig, container.get("marc", {}), "marc"),
                        **_ctr_task_parts(container))
    if run.representation.users:
        raise ConfigError("representation.users=true is supported by task=mra_probe only; task=marc learns "
                          "item representations (set representation.users=false)")
    return run
