import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear

from recsys_compress.compression.apply import quantize_int8
from recsys_compress.compression.low_rank import LowRankLinear, plain_svd
from recsys_compress.compression.pruning import magnitude_mask, wanda_mask
from recsys_compress.models.item_llm import count_parameters, serialized_megabytes


def test_magnitude_keeps_exactly_the_largest_weights():
    W = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])
    mask = magnitude_mask(W, 0.5)
    assert mask.tolist() == [[False, True, True], [True, False, False]]


def test_wanda_compares_within_rows_and_weighs_by_input_norm():
    W = torch.tensor([[1.0, 0.5, 0.4, 0.3], [0.1, 0.2, 0.3, 0.4]])
    # input channel 3 carries large activations: its small weights survive
    sq = torch.tensor([1.0, 1.0, 1.0, 100.0])
    mask = wanda_mask(W, 0.5, sq)
    assert mask.sum(1).tolist() == [2, 2]  # the same count in every output row
    assert mask.tolist() == [[True, False, False, True], [False, False, True, True]]
    # magnitude alone would drop channel 3 in row 0
    assert not magnitude_mask(W, 0.5)[0, 3]


def test_int8_stacked_on_low_rank_quantises_both_factors():
    torch.manual_seed(0)
    dense = torch.nn.Linear(512, 384)  # large enough that weights, not pickle overhead, dominate
    fac = plain_svd(dense.weight.data, 128)
    model = torch.nn.Sequential(LowRankLinear.from_factors(fac.A, fac.B, dense.bias.data))
    x = torch.randn(10, 512)
    reference = model(x)
    params, mb = count_parameters(model), serialized_megabytes(model)
    quantize_int8(model, ["0.down", "0.up"])
    assert isinstance(model[0].down, QuantizedLinear) and isinstance(model[0].up, QuantizedLinear)
    assert count_parameters(model) == params  # counted, not lost inside packed params
    assert serialized_megabytes(model) < 0.5 * mb
    out = model(x)
    # per-tensor int8 weights and activations through two matmuls: a few percent
    assert float((out - reference).norm() / reference.norm()) < 0.05


def test_unknown_method_and_quantize_fail():
    from recsys_compress.compression.config import CompressionConfig
    from recsys_compress.schema import ConfigError

    with pytest.raises(ConfigError, match="allowed: none, svd, asvd, odllm, prune_magnitude, wanda, int8"):
        CompressionConfig(method="gptq")
    with pytest.raises(ConfigError, match="compression.quantize='int4' is not allowed; allowed: null, int8"):
        CompressionConfig(method="svd", quantize="int4")
