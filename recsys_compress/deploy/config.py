"""The ``export`` group's schema: what a compression run writes for deployment."""

from __future__ import annotations

from typing import ClassVar, Literal

from recsys_compress.schema import Schema, require


class ExportConfig(Schema):
    KEY: ClassVar[str] = "export"
    save: bool = True  # the final compressed model as safetensors in RUN_DIR/model (load_compressed reloads it)
    # an ONNX artefact for `recsys-recommend` in RUN_DIR/onnx (int8 runs are quantised by
    # onnxruntime there); without compression, the trained model itself
    onnx: bool = False
    # an int8 run's artefact: activation scales per call (dynamic) or fixed on the compression's
    # calibration batches (static); deploy/export.py INT8_MODES says why dynamic is the default
    int8: Literal["dynamic", "static"] = "dynamic"
    # its int8 weight scales: per output channel, or one per matrix (deploy/export.py INT8_WEIGHTS)
    int8_weights: Literal["per_channel", "per_tensor"] = "per_channel"
    # SmoothQuant's alpha for the inputs int8 rounds (RMSNorm -> q/k/v and gate/up, up_proj ->
    # down_proj; deploy/smoothing.py), fitted on the compression's calibration batches, so that
    # outlier input channels stop setting the int8 range of all the others; null: off. Why 0.5:
    # BENCHMARKS.md, "SmoothQuant through the RMS norms too".
    int8_smooth: float | None = 0.5

    # the options that only an int8 ONNX export reads: a run without one must leave them as declared
    INT8_ONLY: ClassVar[tuple[str, ...]] = ("int8", "int8_weights", "int8_smooth")

    def check(self, p: str) -> None:
        if self.int8_smooth is not None:
            require(0 <= self.int8_smooth <= 1, f"{p}.int8_smooth", self.int8_smooth, "null (off) or 0 to 1")
