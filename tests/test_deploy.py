"""The ONNX artefact matches the eager model; `recommend` returns the eager top-K."""

import json
import logging
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import left_padded_batches as left_padded
from conftest import odllm_on_random_statistics

from recsys_compress.deploy.evaluate import evaluate_artefact
from recsys_compress.deploy.export import export_onnx
from recsys_compress.deploy.recommend import Recommender, to_right_padding
from recsys_compress.deploy.serve import main
from recsys_compress.evaluation.ranking import evaluate_scorer
from recsys_compress.models.item_llm import build_llama
from recsys_compress.models.lit_seqrec import SeqRecLitModule
from recsys_compress.tasks.runner import run_task
from recsys_compress.tasks.compose import compose_config

N_ITEMS, MAX_LEN = 60, 12
RAW_IDS = [str(1000 + 3 * i) for i in range(N_ITEMS)]


def compressed_model():
    torch.manual_seed(0)
    return odllm_on_random_statistics(build_llama(N_ITEMS, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                                  intermediate_size=64, max_len=MAX_LEN).eval())


def left_padded_batches(n: int, seed: int, rows: int = 16) -> list[dict[str, torch.Tensor]]:
    """Histories of every length from 1 to MAX_LEN, left-padded as the datamodule pads them."""
    return left_padded(n, seed, N_ITEMS, MAX_LEN, rows)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    model = compressed_model()
    root = tmp_path_factory.mktemp("deploy")
    texts = [""] + [f"Movie {i}" for i in range(1, N_ITEMS + 1)]
    export_onnx(SeqRecLitModule(model), root / "float", MAX_LEN, RAW_IDS, texts)
    export_onnx(SeqRecLitModule(model), root / "int8", MAX_LEN, RAW_IDS, texts, quantize="int8")
    export_onnx(SeqRecLitModule(model), root / "int8_per_tensor", MAX_LEN, RAW_IDS, texts, quantize="int8", int8_weights="per_tensor")
    export_onnx(SeqRecLitModule(model), root / "int8_static", MAX_LEN, RAW_IDS, texts, quantize="int8", int8="static",
                calibration=left_padded_batches(4, seed=2))
    return model, root


def eager_scores(model, ids, mask):
    """The model as trained and evaluated (left padding), not the export's right-padded wrapper."""
    with torch.no_grad():
        return SeqRecLitModule(model).eval()(torch.as_tensor(ids), torch.as_tensor(mask)).numpy()


def test_onnx_matches_eager_for_other_batch_sizes_and_lengths(artefacts):
    model, root = artefacts
    rec = Recommender(root / "float")
    histories = [RAW_IDS[:1], RAW_IDS[5:9], RAW_IDS[10:40]]  # lengths 1, 4 and > max_len (truncated)
    ids, mask = rec.encode(histories)
    assert ids.shape == (3, MAX_LEN) and mask[0].sum() == 1 and mask[2].sum() == MAX_LEN
    np.testing.assert_allclose(rec.scores(histories), eager_scores(model, ids, mask), atol=1e-4, rtol=1e-4)
    single = rec.encode([RAW_IDS[3:8]])
    assert single[0].shape == (1, 5)
    np.testing.assert_allclose(rec.scores([RAW_IDS[3:8]]), eager_scores(model, *single), atol=1e-4, rtol=1e-4)
    assert json.loads((root / "float" / "deploy.json").read_text())["max_abs_deviation_from_eager"] < 1e-4


@pytest.mark.parametrize("hidden_size, attention", [(32, "MultiHeadAttention"), (64, "GroupQueryAttention")])
def test_attention_and_rotary_run_as_onnxruntime_kernels_and_padding_stays_invisible(
        tmp_path, hidden_size, attention, caplog):
    """4 query heads over 2 key/value heads. Head size 8 runs as MultiHeadAttention beside
    onnxruntime's RotaryEmbedding (its GroupQueryAttention kernel needs a multiple of 16), head
    size 16 as GroupQueryAttention with the rotary embedding inside; either way no rotate_half
    (Neg) and no softmax is left, and histories that no row fills score as the eager model's.
    The converters' per-pass INFO lines stay out of the run's log."""
    torch.manual_seed(0)
    model = build_llama(N_ITEMS, hidden_size=hidden_size, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, max_len=MAX_LEN).eval()
    with caplog.at_level(logging.INFO):
        export_onnx(SeqRecLitModule(model), tmp_path, MAX_LEN, RAW_IDS)
    assert [r.name for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir"))] == []
    assert any(r.name == "recsys_compress.deploy.export" for r in caplog.records)  # ours still logs
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node)
    assert ops[attention] == 2 and ops["Neg"] == 0 and ops["Softmax"] == 0
    assert ops["RotaryEmbedding"] == (4 if attention == "MultiHeadAttention" else 0)  # q and k of each layer
    assert json.loads((tmp_path / "deploy.json").read_text())["fusions"]["cos_sin_cache"] == 4
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, N_ITEMS + 1, (4, MAX_LEN), generator=g)
    mask = torch.zeros_like(ids)
    for row, length in enumerate([1, 3, MAX_LEN - 1, 7]):
        mask[row, MAX_LEN - length:] = 1
    ids = (ids * mask).numpy()
    np.testing.assert_allclose(Recommender(tmp_path).score_indices(ids, mask.numpy()),
                               eager_scores(model, ids, mask), atol=1e-5, rtol=1e-4)


def test_left_padding_becomes_right_padding_item_for_item():
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 0, 0, 0, 9]])
    mask = (ids > 0).astype(np.int64)
    right_ids, right_mask = to_right_padding(ids, mask)
    np.testing.assert_array_equal(right_ids, [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]])
    np.testing.assert_array_equal(right_mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="histories must be left-padded"):
        to_right_padding(right_ids, right_mask)


def test_recommend_returns_the_eager_top_k_without_seen_items(artefacts):
    model, root = artefacts
    rec = Recommender(root / "float")
    history = [RAW_IDS[7], RAW_IDS[2], RAW_IDS[30]]
    top = rec.recommend(history, k=8)
    scores = eager_scores(model, *rec.encode([history]))[0]
    scores[0] = -np.inf
    scores[[8, 3, 31]] = -np.inf
    expected = [RAW_IDS[i - 1] for i in np.argsort(-scores, kind="stable")[:8]]
    assert [r.item_id for r in top] == expected
    assert [r.score for r in top] == sorted((r.score for r in top), reverse=True)
    assert top[0].text == f"Movie {RAW_IDS.index(top[0].item_id) + 1}"
    assert not set(history) & {r.item_id for r in rec.recommend(history, k=N_ITEMS)}
    assert len(rec.recommend(history, k=N_ITEMS)) == N_ITEMS - 3
    assert {RAW_IDS[7]} <= {r.item_id for r in rec.recommend(history, k=N_ITEMS, exclude_seen=False)}


def test_a_history_longer_than_max_len_is_read_as_its_latest_items(artefacts):
    """A long-time user is recommended for who they are now: the artefact reads the last max_len
    items of the history, oldest first, and every item of it still counts as seen."""
    _, root = artefacts
    rec = Recommender(root / "float")
    history = RAW_IDS[5:5 + 2 * MAX_LEN + 3]
    latest = history[-MAX_LEN:]
    np.testing.assert_array_equal(rec.scores([history]), rec.scores([latest]))
    assert not np.array_equal(rec.scores([history]), rec.scores([history[:MAX_LEN]]))
    ids, _ = rec.encode([history])
    assert ids[0].tolist() == [RAW_IDS.index(h) + 1 for h in latest]
    assert rec.recommend(history, k=5, exclude_seen=False) == rec.recommend(latest, k=5, exclude_seen=False)
    assert not set(history) & {r.item_id for r in rec.recommend(history, k=N_ITEMS)}


def test_recommenders_on_one_shared_thread_pool_score_as_on_their_own(artefacts, tmp_path):
    """In a process of its own: the shared pool is process-wide (onnxruntime then refuses
    sessions with pools of their own)."""
    import subprocess
    import sys

    _, root = artefacts
    histories = [RAW_IDS[i:i + 5] for i in range(0, 40, 5)]
    script = f"""
import numpy as np
from recsys_compress.deploy.recommend import Recommender, share_one_thread_pool
share_one_thread_pool(2)
try:
    Recommender({str(root / "float")!r}, threads=3)
except ValueError as e:
    print(e)
for kind in ("float", "int8"):
    np.save({str(tmp_path)!r} + "/" + kind + ".npy", Recommender({str(root)!r} + "/" + kind, threads=2).scores({histories!r}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "threads=3, but this process shares one pool of 2 threads" in out
    for kind in ("float", "int8"):
        np.testing.assert_array_equal(np.load(tmp_path / f"{kind}.npy"), Recommender(root / kind, threads=2).scores(histories))


def test_int8_artefact_is_smaller_and_ranks_like_the_float_model(artefacts):
    _, root = artefacts
    float_rec, int8_rec = Recommender(root / "float"), Recommender(root / "int8")
    assert (root / "int8" / "model.onnx").stat().st_size < (root / "float" / "model.onnx").stat().st_size
    histories = [RAW_IDS[i:i + 6] for i in range(0, 48, 6)]
    a, b = float_rec.scores(histories)[:, 1:], int8_rec.scores(histories)[:, 1:]
    assert not np.array_equal(a, b)  # really quantised
    for row_a, row_b in zip(a, b):
        assert np.corrcoef(row_a, row_b)[0, 1] > 0.95


def weight_scale_sizes(folder) -> set[int]:
    """The sizes of the int8 weights' scales in an artefact (1: one per matrix)."""
    graph = onnx.load(str(folder / "model.onnx")).graph
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    return {sizes[n.input[1].removesuffix("_quantized") + "_scale"] for n in graph.node
            if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") and n.input[1].endswith("_quantized")}


def test_per_channel_int8_weights_keep_the_low_rank_factors_closer_to_eager(artefacts):
    """Dynamic int8 scales each weight per output channel by default: a factor's rank components
    differ in scale by their singular values, and one scale per matrix rounds the small ones
    coarser. Every weight then carries a scale vector (its output width: 5 to 64 here), and the
    scores stay closer to the eager model's than with one scale per matrix (measured on these
    histories: mean |int8 - eager| 0.00115 against 0.00133; on the strong SmolLM2 base the
    score error halves, BENCHMARKS.md)."""
    model, root = artefacts
    assert weight_scale_sizes(root / "int8_per_tensor") == {1}
    assert min(weight_scale_sizes(root / "int8")) > 1
    # the weights' zero points (all 0: symmetric int8) are dropped, or onnxruntime takes its
    # per-column zero-point path for the per-channel graph
    for kind in ("int8", "int8_per_tensor"):
        matmuls = [n for n in onnx.load(str(root / kind / "model.onnx")).graph.node if n.op_type == "MatMulInteger"]
        assert matmuls and all(len(n.input) == 3 for n in matmuls)
    meta = {k: json.loads((root / k / "deploy.json").read_text())["int8_weights"] for k in ("int8", "int8_per_tensor")}
    assert meta == {"int8": "per_channel", "int8_per_tensor": "per_tensor"}
    error = {}
    for kind in ("int8", "int8_per_tensor"):
        rec = Recommender(root / kind)
        error[kind] = np.mean([np.abs(rec.score_indices(b["input_ids"].numpy(), b["attention_mask"].numpy())[:, 1:]
                                      - eager_scores(model, b["input_ids"], b["attention_mask"])[:, 1:]).mean()
                               for b in left_padded_batches(3, seed=5)])
    assert error["int8"] < error["int8_per_tensor"]


def test_int8_weights_are_stored_in_7_bits_and_deploy_json_says_so(artefacts):
    """Every int8 weight of every int8 artefact (dynamic and static, either scale) lies in
    [-64, 63], the 7-bit range that does not saturate uint8 x int8 pairs summed in int16 on CPUs
    without VNNI; deploy.json records the bits, so a kept artefact from before can be told apart."""
    from onnx import numpy_helper

    _, root = artefacts
    for kind in ("int8", "int8_per_tensor", "int8_static"):
        weights = [numpy_helper.to_array(i) for i in onnx.load(str(root / kind / "model.onnx")).graph.initializer
                   if i.data_type == onnx.TensorProto.INT8 and np.prod(i.dims) > 64]
        assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == 64, kind
        assert json.loads((root / kind / "deploy.json").read_text())["int8_weight_bits"] == 7
    assert json.loads((root / "float" / "deploy.json").read_text())["int8_weight_bits"] is None


def test_dropping_the_zero_weight_zero_points_changes_no_score(artefacts, tmp_path):
    import shutil

    from onnxruntime import quantization as q

    from recsys_compress.deploy.export import drop_zero_weight_zero_points

    _, root = artefacts
    shutil.copytree(root / "float", tmp_path / "kept")
    q.quantize_dynamic(str(root / "float" / "model.onnx"), str(tmp_path / "kept" / "model.onnx"),
                       weight_type=q.QuantType.QInt8, per_channel=True)
    shutil.copytree(tmp_path / "kept", tmp_path / "dropped")
    n_matmuls = sum(n.op_type == "MatMulInteger" for n in onnx.load(str(tmp_path / "kept" / "model.onnx")).graph.node)
    assert drop_zero_weight_zero_points(tmp_path / "dropped" / "model.onnx") == n_matmuls > 0
    for batch in left_padded_batches(2, seed=4):
        ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        np.testing.assert_array_equal(Recommender(tmp_path / "dropped").score_indices(ids, mask),
                                      Recommender(tmp_path / "kept").score_indices(ids, mask))


def test_static_int8_artefact_matches_eager_on_histories_it_never_calibrated_on(artefacts):
    """Static int8: activation scales fixed on calibration histories (QDQ around every matmul),
    no per-call quantisation. On users it never calibrated on, every score stays within 2% of the
    eager model's largest score (measured: 0.8%) and every user's scores correlate > 0.999."""
    model, root = artefacts
    graph = onnx.load(str(root / "int8_static" / "model.onnx"))
    ops = Counter(n.op_type for n in graph.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DynamicQuantizeLinear"] == 0
    assert json.loads((root / "int8_static" / "deploy.json").read_text())["int8"] == "static"
    assert (root / "int8_static" / "model.onnx").stat().st_size < (root / "float" / "model.onnx").stat().st_size
    rec, dynamic = Recommender(root / "int8_static"), Recommender(root / "int8")
    for batch in left_padded_batches(2, seed=9):
        ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        want, got = eager_scores(model, ids, mask)[:, 1:], rec.score_indices(ids, mask)[:, 1:]
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
        assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(got, want)) > 0.999
        assert not np.array_equal(got, dynamic.score_indices(ids, mask)[:, 1:])  # its own scales


def test_recommend_cli_and_its_errors(artefacts, capsys):
    _, root = artefacts
    assert main([str(root / "float"), "--history", RAW_IDS[0], RAW_IDS[1], "--k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 3 and set(out[0]) == {"item_id", "text", "score"}
    assert main([str(root / "float"), "--history", RAW_IDS[0], "nope"]) == 2
    assert "unknown item ids ['nope']" in capsys.readouterr().err
    assert main([str(root / "missing"), "--history", RAW_IDS[0]]) == 2
    assert "model.onnx is missing" in capsys.readouterr().err
    assert main([str(root / "float"), "--history", RAW_IDS[0], "--k", "0"]) == 2


def test_an_artefact_of_another_format_is_refused_naming_it(artefacts, tmp_path):
    """A v1 artefact took left-padded histories: fed right-padded ones it would rank wrongly."""
    import shutil

    _, root = artefacts
    old = tmp_path / "v1"
    shutil.copytree(root / "float", old)
    meta = json.loads((old / "deploy.json").read_text())
    (old / "deploy.json").write_text(json.dumps({**meta, "format": "recsys-compress/onnx-v1"}))
    with pytest.raises(ValueError, match=r"has format 'recsys-compress/onnx-v1', expected "
                                         r"'recsys-compress/onnx-v2': export it again"):
        Recommender(old)


def test_export_refuses_wrong_item_list_and_torch_int8(tmp_path):
    model = compressed_model()
    with pytest.raises(ValueError, match="item_ids has 3 entries but the model scores 60 items"):
        export_onnx(SeqRecLitModule(model), tmp_path, MAX_LEN, RAW_IDS[:3])
    with pytest.raises(ValueError, match=r"quantize='int4'; allowed: null, int8"):
        export_onnx(SeqRecLitModule(model), tmp_path, MAX_LEN, RAW_IDS, quantize="int4")
    with pytest.raises(ValueError, match=r"the model is on meta: export_onnx exports a CPU model"):
        export_onnx(SeqRecLitModule(compressed_model().to("meta")), tmp_path, MAX_LEN, RAW_IDS)
    with pytest.raises(ValueError, match=r"int8='fp8'; allowed: dynamic, static"):
        export_onnx(SeqRecLitModule(model), tmp_path, MAX_LEN, RAW_IDS, quantize="int8", int8="fp8")
    with pytest.raises(ValueError, match=r"int8_weights='per_row'; allowed: per_channel, per_tensor"):
        export_onnx(SeqRecLitModule(model), tmp_path, MAX_LEN, RAW_IDS, quantize="int8", int8_weights="per_row")
    with pytest.raises(ValueError, match=r"int8='static' fixes activation scales on calibration histories"):
        export_onnx(SeqRecLitModule(model), tmp_path, MAX_LEN, RAW_IDS, quantize="int8", int8="static")
    from recsys_compress.compression.apply import quantize_int8

    quantize_int8(model, ["model.layers.0.mlp.down_proj.up"])
    with pytest.raises(ValueError, match="torch int8 layers"):
        export_onnx(SeqRecLitModule(model), tmp_path, MAX_LEN, RAW_IDS)


def test_the_artefact_is_tested_like_the_eager_model(artefacts):
    """The float artefact ranks the users' next items as the eager model does: the same
    metrics under both protocols and the same per-user NDCG@10, in batch order."""
    model, root = artefacts
    g = torch.Generator().manual_seed(1)
    batches = []
    for b in range(3):
        ids = torch.randint(1, N_ITEMS + 1, (16, MAX_LEN), generator=g)
        mask = torch.ones_like(ids)
        mask[:, : b * 3] = 0  # left padding, as the datamodule pads
        ids = ids * mask
        batches.append({"input_ids": ids, "attention_mask": mask, "seen": ids,
                        "target": torch.randint(1, N_ITEMS + 1, (16,), generator=g)})
    got, got_per_user = evaluate_artefact(root / "float", batches)
    want, want_per_user = evaluate_scorer(lambda i, m: torch.from_numpy(eager_scores(model, i, m)), batches)
    assert set(got) == set(want) and {"ndcg@10", "seen_excluded/ndcg@10", "seen_kept/hr@10"} <= set(got)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert got["seen_kept/ndcg@10"] != got["seen_excluded/ndcg@10"]  # the two protocols differ here
    torch.testing.assert_close(got_per_user, want_per_user)
    int8, _ = evaluate_artefact(root / "int8", batches)
    assert int8["ndcg@10"] != got["ndcg@10"]  # the int8 graph is another model: measured, not assumed
    kept = []  # each batch's scores as the artefact gave them, before the metrics mask seen items
    evaluate_artefact(root / "float", batches, scores=kept)
    assert len(kept) == len(batches)
    for b, s in zip(batches, kept):
        np.testing.assert_allclose(s, eager_scores(model, b["input_ids"], b["attention_mask"]), atol=1e-4, rtol=1e-4)


# static int8 with smoothing: both read the calibration batches (one list, read twice)
@pytest.mark.parametrize("int8,smooth", [("dynamic", None), ("static", 0.5)])
def test_pipeline_saves_exports_and_quantises_last(tmp_path, int8, smooth, monkeypatch):
    from recsys_compress.tasks import train_seqrec

    calibrated_on = []  # the batches static int8 fixes its scales on, and smoothing its channel scales

    def export_recording(*args, calibration=None, **kwargs):
        if calibration is not None:
            calibration = list(calibration)
            calibrated_on.extend(calibration)
        return export_onnx(*args, calibration=calibration, **kwargs)

    monkeypatch.setattr(train_seqrec, "export_onnx", export_recording)
    overrides = ["compression=odllm", "compression.quantize=int8", "ratio=0.5", "model.hidden_size=16",
                 "model.intermediate_size=32", "dataset.max_len=20", "compression.calib_batches=2",
                 "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "logger=none", "export.onnx=true",
                 f"export.int8={int8}", f"export.int8_smooth={'null' if smooth is None else smooth}",
                 "evaluation.popularity_baseline=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    metrics = run_task(compose_config(overrides, tmp_path))
    assert "stages/compressed/test/ndcg@10" in metrics and "time/quantize_s" in metrics
    assert json.loads((tmp_path / "model" / "compression.json").read_text())["quantize"] == "int8"
    deploy = json.loads((tmp_path / "onnx" / "deploy.json").read_text())
    assert deploy["quantize"] == "int8" and deploy["n_items"] == 9724 and deploy["max_len"] == 20
    assert deploy["int8"] == int8 and deploy["int8_smooth"] == smooth
    assert ("smoothing" in deploy) == (smooth is not None)
    # static int8 and smoothing calibrate on the compression's own batches: ml-latest-small's 5
    # training batches split 2:4 leave 1 for calibration (batch_budget), not the 2 that
    # compression.calib_batches asks
    calibrates = int8 == "static" or smooth is not None
    assert len(calibrated_on) == (metrics["compression/calib_batches"] if calibrates else 0) == \
        (1 if calibrates else 0)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node)
    assert (ops["QuantizeLinear"] > 0) == (int8 == "static") != (ops["DynamicQuantizeLinear"] > 0)
    rec = Recommender(tmp_path / "onnx")
    assert rec.item_ids[:3] == ["1", "2", "3"] and "Toy Story" in rec.texts[0]
    assert len(rec.recommend(["1", "2", "3"], k=10)) == 10
    # the shipped int8 graph is tested on its own, against the same base users
    assert {"deploy/test/ndcg@10", "deploy/test/seen_kept/ndcg@10", "time/deploy_test_s"} <= set(metrics)
    assert metrics["deploy/retention/ndcg@10"] == pytest.approx(
        metrics["deploy/test/ndcg@10"] / metrics["base/test/ndcg@10"])
    assert (metrics["deploy/retention/ndcg@10_ci_low"] <= metrics["deploy/retention/ndcg@10"]
            <= metrics["deploy/retention/ndcg@10_ci_high"])


def test_the_profile_attributes_every_kernel_to_its_role(artefacts):
    """On the low-rank artefacts every targeted layer is two factor matmuls; in the int8 graph
    too, whose nodes the quantiser rewrote (export carries their module paths over)."""
    from profile_onnx import ROLES, profile

    _, root = artefacts
    float_profile, int8_profile = (profile(root / kind, reps=3, length=MAX_LEN, threads=1) for kind in ("float", "int8"))
    assert json.loads((root / "float" / "deploy.json").read_text())["fusions"]  # the fused graph was profiled
    for p in (float_profile, int8_profile):
        assert set(p["roles_ms"]) == set(ROLES)
        assert sum(p["roles_ms"].values()) == pytest.approx(p["kernel_ms_per_call"])
        assert p["roles_ms"]["factor matmuls"] > 0 and p["roles_ms"]["dense projections"] == 0
        assert p["roles_ms"]["attention"] > 0 and p["roles_ms"]["norms"] > 0 and p["roles_ms"]["item head"] > 0
        # only the profiled calls' kernels: on one thread they fit inside those calls (the warm-up
        # calls' kernels would add 8/3 of them); a slow call on a loaded machine moves both sides
        assert 0 < p["kernel_ms_per_call"] <= p["call_ms_mean"] * 1.1
    assert float_profile["roles_ms"]["quantise/dequantise"] == 0 < int8_profile["roles_ms"]["quantise/dequantise"]
    assert any(op.startswith(("MatMulInteger", "DynamicQuantizeMatMul")) for op in int8_profile["ops_ms"])


def test_a_plain_run_with_export_onnx_ships_the_trained_model(tmp_path):
    """export.onnx=true without compression exports the trained model itself, tested as shipped."""
    overrides = ["model.hidden_size=16", "model.intermediate_size=32", "dataset.max_len=20", "trainer.max_epochs=1",
                 "+trainer.limit_train_batches=2", "logger=none", "export.onnx=true",
                 "evaluation.popularity_baseline=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    metrics = run_task(compose_config(overrides, tmp_path / "run"))
    deploy = json.loads((tmp_path / "run" / "onnx" / "deploy.json").read_text())
    assert deploy["method"] == "none" and deploy["quantize"] is None and deploy["max_abs_deviation_from_eager"] < 1e-4
    assert metrics["deploy/test/ndcg@10"] == pytest.approx(metrics["test/ndcg@10"], abs=1e-4)
    assert metrics["deploy/retention/ndcg@10"] == pytest.approx(metrics["deploy/test/ndcg@10"] / metrics["test/ndcg@10"])
    assert len(Recommender(tmp_path / "run" / "onnx").recommend(["1", "2", "3"], k=10)) == 10
    assert not (tmp_path / "run" / "model").exists()  # export.save is the compressed model's
