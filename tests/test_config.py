import itertools
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from recsys_compress.schema import ConfigError
from recsys_compress.tasks.config import validate
from recsys_compress.utils.instantiators import instantiate_group
from recsys_compress.tasks.compose import compose_config

CONF = REPO / "conf"


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides=(), tmp_path=None):
    return compose_config(overrides, tmp_path)


@pytest.mark.parametrize(
    "dataset,model", list(itertools.product(options("dataset"), options("model")))
)
def test_every_dataset_and_model_composes_and_validates(dataset, model, tmp_path):
    overrides = [f"dataset={dataset}", f"model={model}"]
    if dataset == "sequence_text":
        overrides.append("dataset.path=/some/file.txt")
    run = validate(compose_train(overrides, tmp_path))
    assert run.dataset.name == dataset and run.model.name == model


@pytest.mark.parametrize("compression", options("compression"))
def test_every_compression_option_composes(compression, tmp_path):
    run = validate(compose_train([f"compression={compression}", "ratio=0.3"], tmp_path))
    assert run.compression.method == compression and run.ratio == 0.3


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    run = validate(cfg)
    assert cfg.task_name == experiment
    assert run.dataset.name in options("dataset") and run.model.name in options("model")


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_logger_and_callbacks_option_instantiates(trainer, tmp_path):
    from hydra.utils import instantiate

    for logger in options("logger"):
        cfg = compose_train([f"trainer={trainer}", f"logger={logger}"], tmp_path)
        OmegaConf.resolve(cfg)
        loggers = instantiate_group(cfg.get("logger"))
        assert len(loggers) == {"default": 2, "wandb": 1, "csv": 1, "none": 0}[logger]
    callbacks = instantiate_group(cfg.callbacks)
    assert {type(c).__name__ for c in callbacks} >= {"ModelCheckpoint", "RichProgressBar"}
    if cfg.trainer.accelerator != "gpu":  # no GPU here; gpu and fsdp are checked to compose above
        assert instantiate(cfg.trainer, logger=False, callbacks=callbacks).max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize(
    "override,message",
    [
        ("dataset.max_len=0", r"dataset.max_len=0 is out of range; allowed: >= 1"),
        ("dataset.train_windows=some", r"dataset.train_windows='some' is not allowed; allowed: recent, all"),
        ("model=smollm2_135m model.item_init=zeros", r"model.item_init='zeros' is not allowed; allowed: text, random"),
        ("model.hidden_size=63", r"model.hidden_size=63 is out of range; allowed: a multiple of model.num_heads=2"),
        ("model.optim.lr=-1", r"model.optim.lr=-1.0 is out of range; allowed: > 0"),
        ("model.dropout=high", r"model.dropout='high' must be a number"),
        ("+dataset.shuffle=true", r"unknown key dataset.shuffle; allowed keys in dataset: name, format"),
        ("evaluation.hr_ks=[1,5]", r"evaluation.hr_ks=\[1, 5\] is out of range; allowed: must include 1, 5, 10, 20"),
        ("ratio=7", r"ratio=7.0 is out of range; allowed: \(0, 1\]"),
        ("compression=odllm compression.calib_batches=0", r"compression.calib_batches=0 is out of range"),
        ("compression=odllm compression.gram_dtype=float16",
         r"compression.gram_dtype='float16' is not allowed; allowed: float32, float64"),
        ("compression=wavelet", None),
        ("model=smollm2_135m model.gguf_path=null", r"model.source=pretrained needs model.pretrained_path"),
        ("model.finetune=qlora", r"model.finetune='qlora' is not allowed; allowed: full, lora"),
        ("model.lora.r=0", r"model.lora.r=0 is out of range; allowed: >= 1"),
        ("model.lora.target_modules=[]", r"model.lora.target_modules=\[\] is out of range"),
        ("model.optim.item_lr=0", r"model.optim.item_lr=0.0 is out of range; allowed: > 0"),
        ("compression=odllm compression.allocation=best",
         r"compression.allocation='best' is not allowed; allowed: uniform, global, global_relative, zero_sum"),
        ("compression=odllm compression.min_rank=0", r"compression.min_rank=0 is out of range; allowed: >= 1"),
        ("compression=odllm compression.rank_align=0", r"compression.rank_align=0 is out of range; allowed: >= 1"),
        ("compression=wanda compression.rank_align=8",
         r"compression.rank_align=8 rounds ranks: it applies to svd, asvd, odllm, not compression.method=wanda"),
        ("compression=wanda compression.allocation=global",
         r"compression.allocation=global sets ranks: it applies to svd, asvd, odllm, not compression.method=wanda"),
        ("export.int8=int4", r"export.int8='int4' is not allowed; allowed: dynamic, static"),
        ("compression=odllm export.onnx=true export.int8=static",
         r"export.int8=static applies to the ONNX artefact of an int8 run: it needs export.onnx=true and "
         r"compression.quantize=int8 \(or compression=int8\); got export.onnx=True, compression.quantize=None"),
        ("export.int8_weights=per_row", r"export.int8_weights='per_row' is not allowed; allowed: per_channel, per_tensor"),
        ("compression=int8 export.int8_weights=per_tensor",
         r"export.int8_weights=per_tensor applies to the ONNX artefact of an int8 run: it needs export.onnx=true and "
         r"compression.quantize=int8 \(or compression=int8\); got export.onnx=False, compression.quantize=None"),
        ("compression=int8 export.onnx=true export.int8_smooth=1.5",
         r"export.int8_smooth=1.5 is out of range; allowed: null \(off\) or 0 to 1"),
        ("compression=odllm export.onnx=true export.int8_smooth=0.75",
         r"export.int8_smooth=0.75 applies to the ONNX artefact of an int8 run"),
    ],
)
def test_bad_values_fail_at_start_naming_key_and_allowed(override, message, tmp_path):
    if message is None:  # an unknown group option: Hydra lists the available ones
        from hydra.errors import MissingConfigException

        with pytest.raises(MissingConfigException, match="Available options in 'compression'"):
            compose_train(override.split(), tmp_path)
        return
    with pytest.raises(ConfigError, match=message):
        validate(compose_train(override.split(), tmp_path))


def test_unknown_group_option_lists_the_available_ones():
    out = subprocess.run(
        [sys.executable, "train.py", "dataset=ml_10m"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "Could not find 'dataset/ml_10m'" in out.stderr
    assert "ml_100k" in out.stderr and "ml_1m" in out.stderr and "ml_latest_small" in out.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_fsdp_without_a_gpu_fails_at_start_naming_what_works(tmp_path):
    for overrides in (["trainer=fsdp"], ["trainer=fsdp", "trainer.accelerator=cpu"]):
        with pytest.raises(ConfigError, match=r"trainer.strategy=fsdp .* allowed here: trainer=ddp"):
            validate(compose_train(overrides, tmp_path))


def test_the_lora_recipe_asks_for_bf16_only_where_the_hardware_has_it(tmp_path, monkeypatch):
    """``${bf16_mixed_if_supported:}``: the recipe runs as written on a CPU without bf16 (in float32)
    and autocasts where bf16 arithmetic exists."""
    import torch

    import recsys_compress.tasks.config as config_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for has_bf16, precision in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(config_module, "_cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        cfg = compose_train(["experiment=ml100k_smollm2_lora"], tmp_path)
        validate(cfg)
        assert OmegaConf.to_container(cfg, resolve=True)["trainer"]["precision"] == precision


def test_a_gpu_trainer_or_bf16_without_cuda_fails_at_start_naming_the_alternative(tmp_path, monkeypatch):
    import torch

    import recsys_compress.tasks.config as config_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu, but this machine has no CUDA GPU .* "
                                          r"allowed here: trainer=default or trainer=cpu"):
        validate(compose_train(["trainer=gpu"], tmp_path))
    bf16 = ["trainer.precision=bf16-mixed"]
    monkeypatch.setattr(config_module, "_cpu_has_bf16", lambda: True)  # avx512_bf16: CPU autocast is real
    validate(compose_train(bf16, tmp_path))
    monkeypatch.setattr(config_module, "_cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer.precision=bf16-mixed, but there is no CUDA GPU and this CPU "
                                          r"has no avx512_bf16/AMX: set trainer.precision=32-true"):
        validate(compose_train(bf16, tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate(compose_train(["trainer=gpu"], tmp_path))


def test_a_time_cap_needs_no_plus_and_zero_epochs_are_refused(tmp_path):
    run_cfg = compose_train(["trainer.max_time=00:00:30:00", "trainer.max_epochs=-1"], tmp_path)
    validate(run_cfg)
    assert run_cfg.trainer.max_time == "00:00:30:00"
    for bad in (["trainer.max_epochs=0"], ["trainer.max_epochs=-1"]):  # -1 without a time cap never ends
        with pytest.raises(ConfigError, match=r"trainer.max_epochs=-?[01] is out of range; allowed: >= 1, or -1"):
            validate(compose_train(bad, tmp_path))


def test_an_unset_required_value_and_an_unknown_top_level_key_are_named(tmp_path):
    from recsys_compress.tasks.config import validate_marc, validate_probe

    with pytest.raises(ConfigError, match="missing required key dataset.path: set it on the command line"):
        validate(compose_train(["dataset=sequence_text"], tmp_path))
    for validator, task in ((validate, "train"), (validate_probe, "mra_probe"), (validate_marc, "marc")):
        with pytest.raises(ConfigError, match=r"unknown top-level key foo \(.*allowed top-level keys: alignment,"):
            validator(compose_train([f"task={task}", "+foo=1"], tmp_path))


def test_every_registered_method_has_a_config_option_and_every_option_a_method():
    from recsys_compress.compression.methods import METHODS

    assert set(options("compression")) == {"none", *METHODS}
    for method in METHODS:  # each composes into a config the callback accepts
        assert validate(compose_train([f"compression={method}"])).compression.method == method
