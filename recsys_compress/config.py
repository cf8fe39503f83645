"""Typed, validated schemas of the Hydra config groups that our own code consumes.

Each schema is a pydantic model and declares every default of its group once. The defaults
reach the composed config through Hydra's ConfigStore (``register_schemas``: each group's
``base`` option, which the group's YAML files list first), so ``python train.py --cfg job``
shows them and every key can be overridden without a ``+``; the YAML files set only what
differs. pydantic rejects unknown keys and wrong types; each schema's ``check`` holds the
range and cross-field rules. Every failure is a ``ConfigError`` naming the full key and what is
allowed, raised before any work starts. Groups that configure third-party objects through
``_target_`` (trainer, logger, callbacks) are validated by those objects' own constructors.
"""

from __future__ import annotations

import functools
import json
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recsys_compress.compression.names import ALLOCATIONS, DEFAULT_TARGETS, LOW_RANK_METHODS
from recsys_compress.compression.names import METHOD_KINDS as METHODS


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


S = typing.TypeVar("S", bound="Schema")


class Schema(BaseModel):
    """A config group: unknown keys and wrong types fail (strict: no "3" for 3), then ``check``.

    ``KEY`` is where the group sits in the composed config; messages name keys under it.
    """
    model_config = ConfigDict(extra="forbid", strict=True)
    KEY: ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:  # built in Python (scripts, tests): the same errors
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _config_error(type(self), e, self.KEY) from None

    def replace(self: S, **changes: Any) -> S:
        """A validated copy with ``changes`` (``dataclasses.replace`` for schemas)."""
        return type(self)(**{**self.model_dump(), **changes})

    def check(self, p: str) -> None:
        """Range and cross-field rules; raise ``ConfigError`` naming ``p.KEY``."""

    @model_validator(mode="after")
    def _rules(self) -> Schema:
        self.check(self.KEY)
        return self


_TYPE_MESSAGES = {
    "float_type": "must be a number", "int_type": "must be an integer", "bool_type": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list", "model_type": "must be a mapping",
    "dict_type": "must be a mapping", "int_from_float": "must be an integer",
}


def _schema_in(annotation: Any) -> type[Schema] | None:
    candidates = (annotation, *typing.get_args(annotation))
    return next((a for a in candidates if isinstance(a, type) and issubclass(a, Schema)), None)


def _field_path(cls: type[Schema], loc: tuple[Any, ...]) -> tuple[list[str], type[Schema] | None]:
    """The key path of a pydantic error location and the schema that holds its last key.
    Inside a field that is not a schema, string parts are union-member tags ("int",
    "literal['all']"), not keys."""
    path: list[str] = []
    owner, current = cls, cls
    for part in loc:
        if isinstance(part, int):
            path[-1] += f"[{part}]"
        elif current is not None:
            owner = current
            path.append(str(part))
            field = current.model_fields.get(str(part))
            current = _schema_in(field.annotation) if field is not None else None
    return path, owner


def _config_error(cls: type[Schema], error: ValidationError, prefix: str) -> ConfigError:
    """The first problem of ``error`` as a ConfigError with the full key and what is allowed."""
    errors = error.errors()
    for e in errors:  # a rule of ``check``: its message is already complete
        original = (e.get("ctx") or {}).get("error")
        if isinstance(original, ConfigError):
            return original
    first = errors[0]
    path, owner = _field_path(cls, first["loc"])
    key = ".".join(p for p in (prefix, *path) if p)
    same = [e for e in errors if _field_path(cls, e["loc"])[0] == path]  # union members of one field
    value = first.get("input")
    field = owner.model_fields.get(path[-1]) if owner is not None and path else None
    if first["type"] == "extra_forbidden":
        parent = key.rpartition(".")[0] or "the top level"
        allowed = ", ".join(owner.model_fields) if owner is not None else ""
        return ConfigError(f"unknown key {key}; allowed keys in {parent}: {allowed}")
    if first["type"] == "missing":
        if field is not None and _schema_in(field.annotation) is not None:
            return ConfigError(f"missing config group '{key}' (choose one with {key}=NAME)")
        return ConfigError(f"missing required key {key}")
    nullable = field is not None and type(None) in typing.get_args(field.annotation)
    parts = []
    for e in same:
        if e["type"] == "literal_error":
            allowed = ("null, " if nullable else "") + e["ctx"]["expected"].replace("' or '", "', '").replace("'", "")
            parts.append(("is not allowed; allowed: " if len(same) == 1 else "allowed: ") + allowed)
        else:
            parts.append(_TYPE_MESSAGES.get(e["type"], e["msg"].lower()))
    return ConfigError(f"{key}={value!r} " + parts[0] if len(parts) == 1 else f"{key}={value!r}: " + "; ".join(parts))


def parse(cls: type[S], mapping: dict[str, Any]) -> S:
    """``cls`` from plain data; raises ``ConfigError`` naming the offending key."""
    try:
        return cls.model_validate(mapping)
    except ValidationError as e:
        raise _config_error(cls, e, cls.KEY) from None


def defaults_of(cls: type[Schema]) -> dict[str, Any]:
    """The fields of ``cls`` that have defaults, as plain data (what its ``base`` option holds)."""
    out = {}
    for name, f in cls.model_fields.items():
        if f.is_required():
            continue
        value = f.get_default(call_default_factory=True)
        out[name] = defaults_of(type(value)) if isinstance(value, Schema) else value
    return out


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range; allowed: {allowed}")


class DatasetConfig(Schema):
    KEY: ClassVar[str] = "dataset"
    name: str
    format: Literal["grouplens_csv", "recbole_atomic", "sequence_text"]
    path: str
    file_name: str | None = None  # RecBole NAME of NAME.inter; defaults to the folder name
    min_rating: float | None = None  # None: every rating is an interaction
    k_core: int = 0  # keep users and items with >= k interactions (0 or 1: off)
    max_len: int = 50  # the history a model sees (items)
    # recent: one training window per user (the latest max_len items); all: every window
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


class OptimConfig(Schema):
    KEY: ClassVar[str] = "model.optim"
    lr: float = 1e-3
    # Learning rate of the item table (input embeddings and a tied head). null: ``lr``. A
    # pretrained decoder wants a small rate, its new item vocabulary a large one.
    item_lr: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.98])
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


class LoraSettings(Schema):
    """LoRA adapters (PEFT) on the decoder's linears; merged into the weights after training."""
    KEY: ClassVar[str] = "model.lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEARS))

    def check(self, p: str) -> None:
        _require(self.r >= 1, f"{p}.r", self.r, ">= 1")
        _require(self.alpha > 0, f"{p}.alpha", self.alpha, "> 0")
        _require(0 <= self.dropout < 1, f"{p}.dropout", self.dropout, "[0, 1)")
        _require(len(self.target_modules) >= 1, f"{p}.target_modules", self.target_modules,
                 "at least one linear name (e.g. q_proj)")


class ModelConfig(Schema):
    KEY: ClassVar[str] = "model"
    name: str
    source: Literal["scratch", "pretrained"] = "scratch"
    # scratch LLaMA
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int | None = None  # null: same as num_heads (no grouped-query attention)
    intermediate_size: int | None = None  # null: 4 x hidden_size
    dropout: float = 0.1  # attention dropout
    tie_embeddings: bool = True
    # pretrained: a local Hugging Face folder, or a GGUF file converted once into the cache
    pretrained_path: str | None = None
    gguf_path: str | None = None
    item_init: Literal["text", "random"] = "text"  # text: item embeddings start from the LLM's embeddings of the item text
    embedding_dropout: float = 0.1
    # full: every weight trains. lora: the decoder is frozen and LoRA adapters train beside the
    # (always fully trained) item table; the adapters are merged after training, so the cached
    # base model, compression and export see a stock model.
    finetune: Literal["full", "lora"] = "full"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimConfig = Field(default_factory=OptimConfig)

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


class EvaluationConfig(Schema):
    KEY: ClassVar[str] = "evaluation"
    # Full ranking over the whole catalogue, leave-one-out.
    exclude_seen: bool = True  # items already in the user's history are not ranked
    hr_ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])
    ndcg_ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    popularity_baseline: bool = True  # also report the popularity baseline under the same protocol

    def check(self, p: str) -> None:
        for key in ("hr_ks", "ndcg_ks"):
            ks = getattr(self, key)
            _require(bool(ks) and all(k >= 1 for k in ks), f"{p}.{key}", ks, "non-empty, each >= 1")
        # metrics.json promises these keys; a run without them would break reports.
        _require({1, 5, 10, 20} <= set(self.hr_ks), f"{p}.hr_ks", self.hr_ks, "must include 1, 5, 10, 20")
        _require({5, 10, 20} <= set(self.ndcg_ks), f"{p}.ndcg_ks", self.ndcg_ks, "must include 5, 10, 20")


class CompressionConfig(Schema):
    KEY: ClassVar[str] = "compression"
    method: Literal[("none",) + tuple(METHODS)] = "none"  # type: ignore[valid-type]  # compression/methods.py
    # Globs over module names; default: q/k/v/o and gate/up/down of every decoder block.
    include: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude: list[str] = Field(default_factory=list)
    calib_batches: int = 16  # training batches of the recommendation data used for statistics
    heldout_batches: int = 4  # further batches, of users outside calibration: held-out output error
    asvd_alpha: float = 0.5  # asvd: channels scaled by mean|x|^alpha
    quantize: Literal["int8"] | None = None  # stack int8 on a low-rank or pruned model
    # per-batch x^T x (sums are always float64); float32 is faster but can lose positive definiteness
    gram_dtype: Literal["float32", "float64"] = "float64"
    # uniform: every matrix keeps `ratio` of its parameters. global: the same total, spent on the
    # singular directions that remove most error per parameter over all matrices; global_relative:
    # the same on each matrix's normalised spectrum; zero_sum: ZS-SVD, directions removed by their
    # first-order effect on the training loss (compression/allocation.py).
    allocation: Literal[ALLOCATIONS] = "uniform"  # type: ignore[valid-type]
    min_rank: int = 1  # global allocations: the least rank any matrix keeps
    # the data whose loss zero_sum differentiates: train (the calibration batches, the next item at
    # every position) or val (the validation users' held-out next item: a converged model's mean
    # training gradient is near zero, its held-out one is not). Ignored by the other allocations.
    gradient_split: Literal["train", "val"] = "train"
    # every rank a multiple of this, in the same parameter budget (compression/allocation.align_ranks);
    # 1: ranks as allocated
    rank_align: int = 1
    # one decoder block at a time, each calibrated on the output of the compressed blocks below
    # it; only one block's statistics are alive (compression/sequential.py). false: every
    # targeted layer of the model is hooked at once and calibrated on the original activations.
    sequential: bool = False

    def check(self, p: str) -> None:
        _require(self.min_rank >= 1, f"{p}.min_rank", self.min_rank, ">= 1")
        _require(self.rank_align >= 1, f"{p}.rank_align", self.rank_align, ">= 1")
        if self.rank_align > 1 and self.method not in LOW_RANK_METHODS:
            raise ConfigError(f"{p}.rank_align={self.rank_align} rounds ranks: it applies to "
                              f"{', '.join(LOW_RANK_METHODS)}, not {p}.method={self.method}")
        if self.allocation != "uniform" and self.method not in LOW_RANK_METHODS:
            raise ConfigError(f"{p}.allocation={self.allocation} sets ranks: it applies to "
                              f"{', '.join(LOW_RANK_METHODS)}, not {p}.method={self.method}")
        _require(self.calib_batches >= 1, f"{p}.calib_batches", self.calib_batches, ">= 1")
        _require(self.heldout_batches >= 0, f"{p}.heldout_batches", self.heldout_batches, ">= 0 (0: no held-out error)")
        _require(self.asvd_alpha >= 0, f"{p}.asvd_alpha", self.asvd_alpha, ">= 0")
        if self.method != "none" and not self.include:
            raise ConfigError(f"{p}.include is empty: compression.method={self.method} needs layers to compress")

    @property
    def quantizes(self) -> str | None:
        """The int8 step: compression=int8, or int8 stacked on another method."""
        return "int8" if self.method == "int8" else self.quantize


class AlignmentConfig(Schema):
    KEY: ClassVar[str] = "alignment"
    method: Literal["none", "progressive", "progressive_lstsq"] = "none"
    batches: int = 16            # training batches whose hidden states are cached for alignment
    steps_per_layer: int = 100   # progressive: AdamW steps per decoder block
    lr: float = 1e-3             # progressive: 1e-4 for whitened SmolLM2 factors (BENCHMARKS.md)
    weight_decay: float = 0.0
    scheduler: Literal["constant", "cosine"] = "cosine"  # restarts with every block
    warmup_steps: int = 0
    task_weight: float = 0.0     # + task_weight x next-item cross-entropy through the blocks above
    distill_weight: float = 0.0  # + distill_weight x T^2 KL(teacher logits || student logits)
    distill_temperature: float = 1.0
    ridge: float = 1e-4          # progressive_lstsq: Tikhonov term, relative to mean diag((B X)(B X)^T)
    checkpoint: bool = True      # progressive: RUN_DIR/alignment/last.ckpt after every block (resume)
    # keep the teacher's cached per-block hidden states in CPU memory; one at a time goes to the
    # accelerator (README, "Memory at scale")
    offload_states: bool = False

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


class ExportConfig(Schema):
    KEY: ClassVar[str] = "export"
    save: bool  # the final compressed model as safetensors in RUN_DIR/model (declared in conf/train.yaml)
    onnx: bool  # and as an ONNX artefact for `recsys-recommend` in RUN_DIR/onnx
    # an int8 run's artefact: activation scales per call (dynamic) or fixed on the compression's
    # calibration batches (static); deploy/export.py INT8_MODES says why dynamic is the default
    int8: Literal["dynamic", "static"]
    # its int8 weight scales: per output channel, or one per matrix (deploy/export.py INT8_WEIGHTS)
    int8_weights: Literal["per_channel", "per_tensor"]
    # SmoothQuant's alpha for the inputs int8 rounds (RMSNorm -> q/k/v and gate/up, up_proj ->
    # down_proj; deploy/smoothing.py), or null: no smoothing
    int8_smooth: float | None

    def check(self, p: str) -> None:
        if self.int8_smooth is not None:
            _require(0 <= self.int8_smooth <= 1, f"{p}.int8_smooth", self.int8_smooth, "null (off) or 0 to 1")


@functools.cache
def declared_export_defaults() -> dict[str, Any]:
    """The ``export`` group as ``conf/train.yaml`` declares it: the int8-only options' defaults,
    which a run without an int8 ONNX export must leave as they are."""
    from recsys_compress.utils.compose import PROJECT_ROOT

    return OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "train.yaml").export)


class RunConfig(Schema):
    """The parts of the composed config that the training task reads directly. The top-level
    keys (seed, ratio, base_cache, resume, export) are declared in ``conf/train.yaml``."""
    KEY: ClassVar[str] = ""

    seed: int
    dataset: DatasetConfig
    model: ModelConfig
    evaluation: EvaluationConfig
    compression: CompressionConfig
    ratio: float  # the fraction of the targeted matrices' parameters kept
    base_cache: bool
    alignment: AlignmentConfig
    export: ExportConfig
    resume: str | None

    def check(self, p: str) -> None:
        _require(0 < self.ratio <= 1, "ratio", self.ratio, "(0, 1] (the fraction of targeted parameters kept)")
        if self.resume not in (None, "auto") and not Path(self.resume).is_file():
            raise ConfigError(f"resume={self.resume!r}: no such checkpoint file; allowed: null, auto, or a .ckpt path")
        declared = declared_export_defaults()
        for key in ("int8", "int8_weights", "int8_smooth"):
            value = getattr(self.export, key)
            if value != declared[key] and not (self.export.onnx and self.compression.quantizes):
                raise ConfigError(
                    f"export.{key}={value} applies to the ONNX artefact of an int8 run: it needs export.onnx=true and "
                    f"compression.quantize=int8 (or compression=int8); got export.onnx={self.export.onnx}, "
                    f"compression.quantize={self.compression.quantize}, compression.method={self.compression.method}")
        if self.alignment.method != "none" and self.compression.method not in LOW_RANK_METHODS:
            raise ConfigError(
                f"alignment={self.alignment.method} refines low-rank factors, but compression.method="
                f"{self.compression.method}; allowed with alignment: {', '.join(LOW_RANK_METHODS)}")


# Top-level keys that the runner, Hydra's paths and Lightning read, besides the fields of the
# task configs below; together they are every top-level key a run may have.
_INFRASTRUCTURE_KEYS = ("task_name", "task", "paths", "trainer", "logger", "callbacks", "ckpt_path")


def _known_top_level_keys() -> list[str]:
    fields = {name for cls in (RunConfig, ProbeRunConfig, MARCRunConfig, ProxyRunConfig) for name in cls.model_fields}
    return sorted(fields | set(_INFRASTRUCTURE_KEYS))


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


def _fields_of(cls: type[Schema], container: dict[str, Any]) -> dict[str, Any]:
    return {k: container[k] for k in cls.model_fields if k in container}


def validate(cfg: DictConfig) -> RunConfig:
    """Validate the composed config; raises ``ConfigError`` naming the offending key."""
    container = _checked_container(cfg)
    run = parse(RunConfig, _fields_of(RunConfig, container))
    strategy = str((container.get("trainer") or {}).get("strategy", "auto"))
    if run.alignment.method == "progressive" and strategy.startswith(("ddp", "fsdp")):
        raise ConfigError(f"alignment=progressive with trainer.strategy={strategy} is not supported: "
                          "align on one device (trainer=default, cpu or gpu)")
    return run


def _check_trainer(container: dict[str, Any]) -> None:
    """Strategy/accelerator pairs Lightning would refuse deep inside Trainer(): fail at start."""
    trainer = container.get("trainer") or {}
    max_epochs = trainer.get("max_epochs")
    # 0 epochs would "succeed" with an untrained model's metrics; -1 is Lightning's "no limit".
    _require(max_epochs is None or max_epochs >= 1 or (max_epochs == -1 and trainer.get("max_time") is not None),
             "trainer.max_epochs", max_epochs, ">= 1, or -1 (no epoch limit) with trainer.max_time set")
    strategy, accelerator = str(trainer.get("strategy", "auto")), str(trainer.get("accelerator", "auto"))
    precision = str(trainer.get("precision", "32-true"))
    if not (strategy.startswith("fsdp") or accelerator in ("gpu", "cuda") or precision.startswith("bf16")):
        return  # nothing here needs torch: a wrong value elsewhere fails before it loads
    import torch

    cuda = torch.cuda.is_available()
    if strategy.startswith("fsdp") and (accelerator == "cpu" or not cuda):
        raise ConfigError(f"trainer.strategy={strategy} with trainer.accelerator={accelerator}: Lightning's FSDP "
                          "shards over CUDA GPUs and this machine has none; allowed here: trainer=ddp "
                          "(CPU processes on gloo), trainer=default or cpu")
    if accelerator in ("gpu", "cuda") and not cuda:
        raise ConfigError(f"trainer.accelerator={accelerator}, but this machine has no CUDA GPU "
                          "(torch.cuda.is_available() is False); allowed here: trainer=default or trainer=cpu")
    # bf16 autocast on a CPU without bf16 arithmetic is emulated and slower than float32.
    if precision.startswith("bf16") and not _bf16_is_real():
        raise ConfigError(f"trainer.precision={precision}, but there is no CUDA GPU and this CPU has no "
                          "avx512_bf16/AMX: set trainer.precision=32-true")


def _bf16_is_real() -> bool:
    """bf16 arithmetic in hardware: a CUDA GPU, or a CPU with avx512_bf16/AMX."""
    import torch

    return torch.cuda.is_available() or _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class ProbeConfig(Schema):
    KEY: ClassVar[str] = "probe"
    layer: int | Literal["all"] = 15  # 0 (token embeddings) .. n_layers (final output), or all
    dim: int = 32
    # linear (trained with the task) | pca (fitted once, frozen) | none (ID-only baseline)
    compressor: Literal["linear", "pca", "none"] = "linear"

    def check(self, p: str) -> None:
        _require(self.dim >= 1, f"{p}.dim", self.dim, ">= 1")
        if self.layer != "all":
            _require(self.layer >= 0, f"{p}.layer", self.layer, "a layer index >= 0, or all")


class RepresentationConfig(Schema):
    KEY: ClassVar[str] = "representation"
    model: Literal["smollm2_135m", "minilm", "llama_tiny", "hf"] = "smollm2_135m"
    path: str | None = None  # a Hugging Face folder (for smollm2_135m: instead of the GGUF conversion)
    gguf_path: str | None = None
    template: str = "{title}. Genres: {genres}"  # fields: title (with year), year, genres, id
    batch_size: int = 64
    max_tokens: int = 64
    # User representations (task=mra_probe): the user's profile and most recent training-split
    # items as text, encoded like the items and fed to the CTR model as a second feature.
    # Template fields: profile, history, id.
    users: bool = False
    user_template: str = "A viewer ({profile}) who recently rated: {history}"
    user_history: int = 10
    user_max_tokens: int = 160
    # A task=proxy run directory: its fine-tuned top blocks replace the pretrained ones in every
    # consumer (probes at every layer, MARC, the caches, keyed on the changed weights).
    encoder_run: str | None = None

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


class CTRConfig(Schema):
    KEY: ClassVar[str] = "ctr"
    threshold: float = 4.0  # label = rating >= threshold
    split: list[float] = Field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test fractions
    # time: per user, time-ordered (warm items) | item: random item partition, val/test items
    # never seen in training (item cold start; seeded by `seed`)
    split_by: Literal["time", "item"] = "time"
    id_dim: int = 16
    cross_layers: int = 2
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    dropout: float = 0.1
    # fraction of training samples whose item id embedding is zeroed, so the model learns to
    # score items from their representation (cold items always get a zero id embedding);
    # 1.0 = no item ids at all
    item_id_dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 2048
    eval_batch_size: int = 8192
    # sample: random batches of batch_size | item: every training sample of items_per_batch
    # random items per step (how MARC's task module trains)
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


class ProbeRunConfig(Schema):
    KEY: ClassVar[str] = ""
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


def validate_probe(cfg: DictConfig) -> ProbeRunConfig:
    """Validate a ``task=mra_probe`` config; raises ``ConfigError`` naming the offending key."""
    container = _checked_ctr_container(cfg)
    run = parse(ProbeRunConfig, _fields_of(ProbeRunConfig, container))
    check_encoder_run(run)
    if run.representation.users and run.probe.compressor == "none":
        raise ConfigError("representation.users=true needs representations; probe.compressor=none is the "
                          "ID-only baseline (allowed with users: linear, pca)")
    return run


class MARCConfig(Schema):
    KEY: ClassVar[str] = "marc"
    dim: int = 32  # the code size of the bottleneck
    beta: float = 1e-3  # weight of KL(q(z|h) || N(0, I))
    trainable_layers: int = 2  # last k LLM blocks trained (0: frozen LLM); the states below are cached
    finetune: Literal["full", "lora"] = "full"  # lora: PEFT LoRA on the trainable blocks
    lora_r: int = 8
    constraint: Literal["none", "hsic"] = "none"  # hsic: + hsic_weight x HSIC(z, task module's last hidden layer)
    hsic_weight: float = 0.1
    items_per_batch: int = 32  # a step takes every training sample of this many items
    lr: float = 1e-3  # compression and task modules
    llm_lr: float = 1e-4  # the trainable LLM blocks
    # true: the deployed CTR model trains on samples mu + sigma * eps of the exported posterior
    # (item_codes.safetensors holds mu and logvar) and is tested on mu
    deploy_noise: bool = False
    # null: deployment caches all marc.dim dimensions of mu | k: only the k with the largest mean
    # KL to the prior; a fresh model can memorise training items by the nearly empty ones
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


class MARCRunConfig(Schema):
    KEY: ClassVar[str] = ""
    seed: int
    dataset: DatasetConfig
    marc: MARCConfig
    representation: RepresentationConfig
    ctr: CTRConfig


class ProxyConfig(Schema):
    KEY: ClassVar[str] = "proxy"
    # contrastive: InfoNCE between a user's text (profile + recent training items) and an item
    # the user rated positively, in-batch negatives | mrl: the same on the nested prefixes
    # dim, dim/2, ..., dim/2^(mrl_levels-1) (Matryoshka), losses summed | cosine: the user-item
    # cosine regressed to 1 for the positive, 0 for the batch's other items (no temperature) |
    # ntp: next-token prediction on the batch's user and item texts; the head is then the PCA of
    # the training items' pooled final layer
    objective: Literal["contrastive", "mrl", "cosine", "ntp"] = "contrastive"
    dim: int = 32  # the compression head's output: the proxy's deployed code
    mrl_levels: int = 3
    # 0.2 and lr 1e-2: head-only sweep on ML-1M (BENCHMARKS.md, proxy section): at 0.05 the
    # random head starts at twice the chance loss and spends its steps unlearning that
    temperature: float = 0.2
    trainable_layers: int = 2  # last k LLM blocks trained; the states below are cached (as task=marc)
    steps: int = 300
    batch_size: int = 64  # (user, positive item) pairs per step
    lr: float = 1e-2  # the compression head
    llm_lr: float = 1e-4  # the trainable LLM blocks
    # positive validation pairs the held-out proxy loss is measured on, before and after training
    # (whole batches of batch_size; on an item split these items are cold: the loss says whether
    # the proxy generalises from text, which the training loss cannot)
    val_pairs: int = 2048

    def check(self, p: str) -> None:
        _require(self.dim >= 1, f"{p}.dim", self.dim, ">= 1")
        _require(self.mrl_levels >= 1, f"{p}.mrl_levels", self.mrl_levels, ">= 1")
        if self.objective == "mrl":
            from recsys_compress.representations.proxy import mrl_prefixes  # the rule, declared there

            try:
                mrl_prefixes(self.dim, self.mrl_levels)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        _require(self.temperature > 0, f"{p}.temperature", self.temperature, "> 0")
        _require(self.trainable_layers >= 1, f"{p}.trainable_layers", self.trainable_layers, ">= 1")
        _require(self.steps >= 1, f"{p}.steps", self.steps, ">= 1")
        _require(self.batch_size >= 2, f"{p}.batch_size", self.batch_size, ">= 2 (in-batch negatives)")
        _require(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        _require(self.llm_lr > 0, f"{p}.llm_lr", self.llm_lr, "> 0")
        _require(self.val_pairs >= self.batch_size, f"{p}.val_pairs", self.val_pairs,
                 f">= proxy.batch_size ({self.batch_size}): one whole batch")


class ProxyRunConfig(Schema):
    KEY: ClassVar[str] = ""
    seed: int
    dataset: DatasetConfig
    proxy: ProxyConfig
    representation: RepresentationConfig
    ctr: CTRConfig


def validate_proxy(cfg: DictConfig) -> ProxyRunConfig:
    """Validate a ``task=proxy`` config; raises ``ConfigError`` naming the offending key."""
    container = _checked_ctr_container(cfg)
    run = parse(ProxyRunConfig, _fields_of(ProxyRunConfig, container))
    if run.representation.encoder_run:
        raise ConfigError("representation.encoder_run is what task=proxy writes; it starts from the pretrained "
                          "model (set representation.encoder_run=null)")
    return run


def validate_marc(cfg: DictConfig) -> MARCRunConfig:
    """Validate a ``task=marc`` config; raises ``ConfigError`` naming the offending key."""
    container = _checked_ctr_container(cfg)
    run = parse(MARCRunConfig, _fields_of(MARCRunConfig, container))
    check_encoder_run(run)
    if run.representation.users:
        raise ConfigError("representation.users=true is supported by task=mra_probe only; task=marc learns "
                          "item representations (set representation.users=false)")
    return run


PROXY_ENCODER_FORMAT = "recsys-compress/proxy-encoder-v1"


def proxy_encoder_identity(run: Any) -> dict[str, Any]:
    """What a proxy-fine-tuned encoder must share with a run that reads it: the pretrained
    model and the data whose CTR training split it was trained on."""
    c = run.ctr
    return {"representation": run.representation.model, "dataset": run.dataset.name, "ctr.split": list(c.split),
            "ctr.split_by": c.split_by, "ctr.threshold": c.threshold, "seed": run.seed}


def check_encoder_run(run: Any) -> None:
    """``representation.encoder_run`` names a task=proxy run trained on this run's data and split."""
    folder = run.representation.encoder_run
    if folder is None:
        return
    info_path = Path(folder) / "encoder" / "encoder.json"
    if not Path(folder).is_dir():
        raise ConfigError(f"representation.encoder_run={folder} does not exist (a task=proxy run directory)")
    if not info_path.is_file():
        raise ConfigError(f"representation.encoder_run={folder} holds no encoder ({info_path} is missing): "
                          "give the run directory of a finished task=proxy run")
    info = json.loads(info_path.read_text())
    if info.get("format") != PROXY_ENCODER_FORMAT:
        raise ConfigError(f"{info_path} has format {info.get('format')!r}, expected {PROXY_ENCODER_FORMAT!r}")
    # the seed decides an item split's partition; a time split is the same for every seed
    differ = [f"{k}: encoder {info['trained_on'].get(k)!r}, this run {v!r}"
              for k, v in proxy_encoder_identity(run).items()
              if info["trained_on"].get(k) != v and not (k == "seed" and run.ctr.split_by == "time")]
    if differ:
        raise ConfigError(f"representation.encoder_run={folder} was trained on other data or another split ("
                          + "; ".join(differ) + "): its CTR training split may hold this run's test samples")


# The config groups whose defaults the schemas declare: each gets a ``base`` option in Hydra's
# ConfigStore, listed first in the defaults of every YAML option of the group.
GROUP_SCHEMAS: dict[str, type[Schema]] = {
    "dataset": DatasetConfig, "model": ModelConfig, "evaluation": EvaluationConfig,
    "compression": CompressionConfig, "alignment": AlignmentConfig, "representation": RepresentationConfig,
    "ctr": CTRConfig, "probe": ProbeConfig, "marc": MARCConfig, "proxy": ProxyConfig,
}


def encoder_subject(model: str, encoder_run: str | None) -> str:
    """What a representation run is about, for its W&B name, group and tags: the model, or
    ``model+RUN`` when it reads a proxy run's fine-tuned encoder (``RUN`` its folder's name), so
    that the runs of one encoder group together and apart from the pretrained model's."""
    return f"{model}+{Path(encoder_run).name}" if encoder_run else model


def bf16_mixed_if_supported() -> str:
    """The precision a recipe asks for with ``${bf16_mixed_if_supported:}``: ``bf16-mixed`` where
    bf16 arithmetic is real (a CUDA GPU, or a CPU with avx512_bf16/AMX), else ``32-true``, so that
    the recipe runs as written on any machine. An explicit ``trainer.precision=bf16-mixed`` on a
    machine without it still fails at start (``_check_trainer``), by the same rule."""
    return "bf16-mixed" if _bf16_is_real() else "32-true"


def register_schemas() -> None:
    """Put every group's schema defaults into Hydra's ConfigStore as ``GROUP/base``, and the
    config's resolvers into OmegaConf (call before composing: ``train.py`` and
    ``utils/compose.py`` do)."""
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("encoder_subject", encoder_subject, replace=True)
    OmegaConf.register_new_resolver("bf16_mixed_if_supported", bf16_mixed_if_supported, replace=True)

    store = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name="base", node=defaults_of(schema))


def validate_task(cfg: DictConfig) -> Schema | None:
    """Validate ``cfg`` with its task's validator (None for a task without one). Imports nothing
    heavy, so the runner calls it before it loads a task: a wrong value fails in seconds."""
    validators = {"train": validate, "mra_probe": validate_probe, "marc": validate_marc, "proxy": validate_proxy}
    validator = validators.get(str(OmegaConf.select(cfg, "task.name", default="")))
    return validator(cfg) if validator else None
