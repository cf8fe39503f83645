"""The ``representation`` and ``proxy`` groups' schemas, and the rules a proxy-trained encoder
must meet to be read by a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from recsys_compress.schema import ConfigError, Schema, require


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
        require(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, ">= 1")
        require(self.max_tokens >= 1, f"{p}.max_tokens", self.max_tokens, ">= 1")
        require(self.user_history >= 0, f"{p}.user_history", self.user_history, ">= 0")
        require(self.user_max_tokens >= 1, f"{p}.user_max_tokens", self.user_max_tokens, ">= 1")
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


def mrl_prefixes(dim: int, levels: int) -> list[int]:
    """dim, dim/2, ..., dim/2^(levels-1): the nested code sizes Matryoshka learning trains
    (``ProxyConfig.check`` applies this rule at start, the proxy's loss trains them)."""
    step = 2 ** (levels - 1)
    if dim % step:
        raise ValueError(f"proxy.dim={dim} is not divisible by 2^(proxy.mrl_levels-1) = {step}: MRL's prefixes "
                         f"halve it {levels - 1} times; allowed: a multiple of {step}, or fewer levels")
    return [dim >> level for level in range(levels)]


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
        require(self.dim >= 1, f"{p}.dim", self.dim, ">= 1")
        require(self.mrl_levels >= 1, f"{p}.mrl_levels", self.mrl_levels, ">= 1")
        if self.objective == "mrl":
            try:
                mrl_prefixes(self.dim, self.mrl_levels)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        require(self.temperature > 0, f"{p}.temperature", self.temperature, "> 0")
        require(self.trainable_layers >= 1, f"{p}.trainable_layers", self.trainable_layers, ">= 1")
        require(self.steps >= 1, f"{p}.steps", self.steps, ">= 1")
        require(self.batch_size >= 2, f"{p}.batch_size", self.batch_size, ">= 2 (in-batch negatives)")
        require(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        require(self.llm_lr > 0, f"{p}.llm_lr", self.llm_lr, "> 0")
        require(self.val_pairs >= self.batch_size, f"{p}.val_pairs", self.val_pairs,
                 f">= proxy.batch_size ({self.batch_size}): one whole batch")


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


def encoder_subject(model: str, encoder_run: str | None) -> str:
    """What a representation run is about, for its W&B name, group and tags: the model, or
    ``model+RUN`` when it reads a proxy run's fine-tuned encoder (``RUN`` its folder's name), so
    that the runs of one encoder group together and apart from the pretrained model's."""
    return f"{model}+{Path(encoder_run).name}" if encoder_run else model
