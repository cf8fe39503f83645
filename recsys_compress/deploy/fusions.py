"""Rewrite an exported decoder graph into onnxruntime's fused operators.

onnxscript's ``optimize_for_ort`` does the work: RMS norm (with the residual add), the rotary
embedding, and attention as one ``GroupQueryAttention`` kernel (grouped-query attention with the
rotary embedding inside and no key/value repeat) or ``MultiHeadAttention``. It finds the rotary
embedding's cos/sin cache only in the form ``inv_freq @ positions``; torch exports transformers'
cache as the broadcast product ``positions * inv_freq`` (the matmul has an inner dimension of 1),
so the rotary embedding stayed four kernels per projection (Slice, Slice, Neg, Concat), and the
attention stayed MultiHeadAttention with the key/value repeat beside it. ``RotaryCacheFromPositions``
is the one rule added here: it matches that form and hands onnxruntime a constant cache of
``max_len`` positions, after which the library's own attention fusions apply.

``GroupQueryAttention`` takes each sequence's length instead of an attention mask and counts a
sequence's positions from its first slot: that is right padding (real items first), which is why
the artefact's graph takes right-padded histories (``export.ItemScorer``).
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np


def _rotary_cache_rule(max_len: int):
    """The rewrite rule for the cos/sin cache as torch exports it (the class is built here, over
    ``max_len``, because onnxscript is imported only when a graph is fused)."""
    import onnx_ir as ir
    from onnxscript.rewriter import _ir_utils, pattern
    from onnxscript.rewriter.ort_fusions.cos_sin_cache import CosSinCacheFusion

    class RotaryCacheFromPositions(CosSinCacheFusion):
        """``RotaryEmbedding(x, cos, sin)`` with ``cos, sin = cos/sin(cat(f, f))`` and
        ``f = float(position_ids[..., None]) * inv_freq`` -> onnxruntime's ``RotaryEmbedding(x,
        position_ids, cos_cache, sin_cache)``, the cache a constant of ``max_len`` positions."""

        def pattern(self, op, x, inv_freq, position_ids, interleaved, num_heads, last_axis):
            freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, last_axis), to=ir.DataType.FLOAT), inv_freq)
            emb = op.Concat(freqs, freqs, axis=-1)
            return op.RotaryEmbedding(x, op.Unsqueeze(op.Cos(emb), [1]), op.Unsqueeze(op.Sin(emb), [1]),
                                      interleaved=interleaved, num_heads=num_heads,
                                      _domain="ai.onnxruntime._fusion")

        def check(self, context, inv_freq, position_ids, last_axis, **_) -> pattern.MatchResult:
            result = pattern.MatchResult()
            if inv_freq.const_value is None or not _ir_utils.has_rank(inv_freq, 1):
                return result.fail("inv_freq is not a 1-D constant", inv_freq)
            if not _ir_utils.has_rank(position_ids, 2) or not any(
                    _ir_utils.is_singleton_value(last_axis, axis) for axis in (-1, 2)):
                return result.fail("position_ids is not a [batch, length] tensor unsqueezed last", position_ids)
            return result

        def rewrite(self, op, x, inv_freq, position_ids, interleaved, num_heads, **_):
            if inv_freq not in self._inv_freq_cos_sin_cache:  # one cache for every layer
                angles = np.arange(max_len, dtype=np.float32)[:, None] * inv_freq.const_value.numpy()[None, :]
                self._inv_freq_cos_sin_cache[inv_freq] = self._compute_const_freqs(op, angles)
            cos, sin = self._inv_freq_cos_sin_cache[inv_freq]
            return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=interleaved, num_heads=num_heads,
                                      _domain="com.microsoft")

    return RotaryCacheFromPositions.rule("RotaryCacheFromPositions")


# onnxruntime's CPU GroupQueryAttention kernel refuses other head sizes at run time.
GQA_HEAD_MULTIPLE = 16


def fuse_for_onnxruntime(path: str | Path, max_len: int, head_dim: int) -> dict[str, int]:
    """Rewrite the graph at ``path`` in place into onnxruntime's fused operators; ``max_len``:
    the longest history the graph takes (the rotary cache's rows); ``head_dim``: the attention
    head size (``GroupQueryAttention`` only where it is a multiple of ``GQA_HEAD_MULTIPLE``,
    ``MultiHeadAttention`` otherwise). Returns the fusions' counts (``cos_sin_cache`` counts
    the rotary embeddings that reached onnxruntime's kernel)."""
    import onnx_ir as ir
    from onnxscript.rewriter import _fusion_utils, pattern
    from onnxscript.rewriter.ort_fusions import _core
    from onnxscript.rewriter.ort_fusions.cos_sin_cache import fuse_cos_sin_cache
    from onnxscript.rewriter.ort_fusions.gqa import fuse_gqa

    from_positions = _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet([_rotary_cache_rule(max_len)]))

    def cos_sin_cache(model, debug: bool = False, **kwargs) -> int:
        return fuse_cos_sin_cache(model, debug=debug, **kwargs) + from_positions(model, debug=debug, **kwargs)

    def gqa(model, debug: bool = False, **kwargs) -> int:
        return fuse_gqa(model, debug=debug, **kwargs) if head_dim % GQA_HEAD_MULTIPLE == 0 else 0

    model = ir.load(str(path))
    # optimize_for_ort takes no rules of ours: the added rule runs where the library runs its
    # own cos/sin cache rules (after the rotary embeddings are found, before attention is fused).
    with mock.patch.object(_core, "fuse_cos_sin_cache", cos_sin_cache), mock.patch.object(_core, "fuse_gqa", gqa):
        model, counts = _core.optimize_for_ort(model)
    ir.save(model, str(path))
    return {name: n for name, n in counts.items() if n}
