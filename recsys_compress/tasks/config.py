"""The run-level schemas of the tasks, validation of a whole composed config, and Hydra's
registration of every group's defaults (``GROUP/base``) and of the config's resolvers.

Each group's own schema lives beside the code it configures; this module puts them together.
It imports nothing heavy (no torch), so a wrong value fails before a task loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from omegaconf import DictConfig, OmegaConf

from recsys_compress.alignment.config import AlignmentConfig
from recsys_compress.compression.config import CompressionConfig
from recsys_compress.compression.names import LOW_RANK_METHODS
from recsys_compress.ctr.config import CTRConfig
from recsys_compress.data.config import DatasetConfig
from recsys_compress.deploy.config import ExportConfig
from recsys_compress.evaluation.config import EvaluationConfig
from recsys_compress.marc.config import MARCConfig
from recsys_compress.models.config import ModelConfig
from recsys_compress.representations.config import (
    ProxyConfig,
    RepresentationConfig,
    check_encoder_run,
    encoder_subject,
)
from recsys_compress.schema import ConfigError, Schema, defaults_of, parse, require
from recsys_compress.tokenizers.config import SemanticIDsConfig


class ProbeConfig(Schema):
    KEY: ClassVar[str] = "probe"
    layer: int | Literal["all"] = 15  # 0 (token embeddings) .. n_layers (final output), or all
    dim: int = 32
    # linear (trained with the task) | pca (fitted once, frozen) | none (ID-only baseline)
    compressor: Literal["linear", "pca", "none"] = "linear"

    def check(self, p: str) -> None:
        require(self.dim >= 1, f"{p}.dim", self.dim, ">= 1")
        if self.layer != "all":
            require(self.layer >= 0, f"{p}.layer", self.layer, "a layer index >= 0, or all")


class RunConfig(Schema):
    """The parts of the composed config that the training task reads directly. The top-level
    keys (seed, ratio, base_cache, resume) are declared in ``conf/train.yaml``."""
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
    # atomic: one vocabulary token per item; semantic: a tuple of code tokens per item, generated
    # (conf/item_ids/, which brings the semantic and representation groups the index needs)
    item_ids: Literal["atomic", "semantic"] = "atomic"
    semantic: SemanticIDsConfig | None = None
    representation: RepresentationConfig | None = None

    def check(self, p: str) -> None:
        if self.item_ids == "semantic":
            if self.semantic is None or self.representation is None:
                raise ConfigError("item_ids=semantic needs the semantic and representation groups: choose it as a "
                                  "group (item_ids=semantic on the command line), not as a value")
            if self.model.source != "scratch":
                raise ConfigError(f"item_ids=semantic with model.source={self.model.source}: extending a pretrained "
                                  "model's tokenizer with code tokens (LC-Rec's way) is not built yet; allowed: "
                                  "model=llama_tiny (model.source=scratch)")
            if self.export.onnx and self.compression.quantizes and self.export.int8 == "static":
                raise ConfigError("export.int8=static with item_ids=semantic: static scales are calibrated on "
                                  "the atomic graph's item histories, the generative step graph reads code-token "
                                  "queries; allowed: export.int8=dynamic")
        require(0 < self.ratio <= 1, "ratio", self.ratio, "(0, 1] (the fraction of targeted parameters kept)")
        if self.resume not in (None, "auto") and not Path(self.resume).is_file():
            raise ConfigError(f"resume={self.resume!r}: no such checkpoint file; allowed: null, auto, or a .ckpt path")
        declared = defaults_of(ExportConfig)
        for key in ExportConfig.INT8_ONLY:
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
    fields = {name for cls in (RunConfig, ProbeRunConfig, MARCRunConfig, ProxyRunConfig, SemanticRunConfig)
              for name in cls.model_fields}
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
    require(max_epochs is None or max_epochs >= 1 or (max_epochs == -1 and trainer.get("max_time") is not None),
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


class MARCRunConfig(Schema):
    KEY: ClassVar[str] = ""
    seed: int
    dataset: DatasetConfig
    marc: MARCConfig
    representation: RepresentationConfig
    ctr: CTRConfig


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


class SemanticRunConfig(Schema):
    KEY: ClassVar[str] = ""
    seed: int
    dataset: DatasetConfig
    representation: RepresentationConfig
    semantic: SemanticIDsConfig


def validate_semantic(cfg: DictConfig) -> SemanticRunConfig:
    """Validate a ``task=semantic_ids`` config; raises ``ConfigError`` naming the offending key."""
    container = _checked_container(cfg)
    return parse(SemanticRunConfig, _fields_of(SemanticRunConfig, container))


def validate_marc(cfg: DictConfig) -> MARCRunConfig:
    """Validate a ``task=marc`` config; raises ``ConfigError`` naming the offending key."""
    container = _checked_ctr_container(cfg)
    run = parse(MARCRunConfig, _fields_of(MARCRunConfig, container))
    check_encoder_run(run)
    if run.representation.users:
        raise ConfigError("representation.users=true is supported by task=mra_probe only; task=marc learns "
                          "item representations (set representation.users=false)")
    return run


# The config groups whose defaults the schemas declare: each gets a ``base`` option in Hydra's
# ConfigStore, listed first in the defaults of every YAML option of the group.
GROUP_SCHEMAS: dict[str, type[Schema]] = {
    "dataset": DatasetConfig, "model": ModelConfig, "evaluation": EvaluationConfig,
    "compression": CompressionConfig, "alignment": AlignmentConfig, "representation": RepresentationConfig,
    "ctr": CTRConfig, "probe": ProbeConfig, "marc": MARCConfig, "proxy": ProxyConfig, "export": ExportConfig,
    "semantic": SemanticIDsConfig,
}


def bf16_mixed_if_supported() -> str:
    """The precision a recipe asks for with ``${bf16_mixed_if_supported:}``: ``bf16-mixed`` where
    bf16 arithmetic is real (a CUDA GPU, or a CPU with avx512_bf16/AMX), else ``32-true``, so that
    the recipe runs as written on any machine. An explicit ``trainer.precision=bf16-mixed`` on a
    machine without it still fails at start (``_check_trainer``), by the same rule."""
    return "bf16-mixed" if _bf16_is_real() else "32-true"


def register_schemas() -> None:
    """Put every group's schema defaults into Hydra's ConfigStore as ``GROUP/base``, and the
    config's resolvers into OmegaConf (call before composing: ``train.py`` and
    ``tasks/compose.py`` do)."""
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("encoder_subject", encoder_subject, replace=True)
    OmegaConf.register_new_resolver("bf16_mixed_if_supported", bf16_mixed_if_supported, replace=True)

    store = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name="base", node=defaults_of(schema))


def validate_task(cfg: DictConfig) -> Schema | None:
    """Validate ``cfg`` with its task's validator (None for a task without one). Imports nothing
    heavy, so the runner calls it before it loads a task: a wrong value fails in seconds."""
    validators = {"train": validate, "mra_probe": validate_probe, "marc": validate_marc, "proxy": validate_proxy,
                  "semantic_ids": validate_semantic}
    validator = validators.get(str(OmegaConf.select(cfg, "task.name", default="")))
    return validator(cfg) if validator else None
