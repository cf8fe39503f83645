"""Progressive alignment: only the current block trains, errors fall, lstsq is exact, resume works."""

import copy
import json

import lightning as L
import pytest
import torch

from recsys_compress.alignment.block_cache import capture_teacher
from recsys_compress.models.blocks import decoder_blocks, run_block
from recsys_compress.alignment.lstsq import progressive_lstsq, refit_left_factor
from recsys_compress.alignment.progressive import AlignmentError, ProgressiveAlignmentModule, check_alignable
from recsys_compress.alignment.runner import align
from recsys_compress.compression.apply import compress_low_rank
from recsys_compress.compression.calibration import collect_input_stats, select_linear_layers
from recsys_compress.alignment.config import AlignmentConfig
from recsys_compress.schema import ConfigError
from recsys_compress.tasks.config import validate
from recsys_compress.data.datamodule import NextItemDataModule
from recsys_compress.models.item_llm import build_llama
from recsys_compress.models.item_llm import position_ids_for
from recsys_compress.models.lit_seqrec import SeqRecLitModule
from recsys_compress.tasks.runner import run_task
from recsys_compress.tasks.compose import compose_config

from conftest import SMALL


def atomic(model):
    """The atomic recommender around ``model``: the seam alignment calls."""
    return SeqRecLitModule(model)


@pytest.fixture(scope="module")
def batches():
    dm = NextItemDataModule(format="grouplens_csv", path=str(SMALL), max_len=20, batch_size=16, seed=0)
    dm.setup()
    loader = iter(dm.train_dataloader())
    return [next(loader) for _ in range(4)], dm.n_items


@pytest.fixture(scope="module")
def teacher_student(batches):
    data, n_items = batches
    torch.manual_seed(0)
    teacher = build_llama(n_items, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=64, max_len=20, dropout=0.0).eval()
    student = copy.deepcopy(teacher)
    names = select_linear_layers(student)
    stats = collect_input_stats(
        student, names, data, lambda b: student.base_model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"],
            position_ids=position_ids_for(b["attention_mask"])), max_batches=4)
    compress_low_rank(student, names, "odllm", 0.3, stats)
    return teacher, student


def trainer(max_steps, callbacks=(), **kw):
    return L.Trainer(max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks), **kw)


def hidden_errors(teacher, student, data):
    """Per block: MSE between student and teacher hidden states leaving it (end to end)."""
    cache = capture_teacher(teacher, data, len(data), torch.device("cpu"), atomic(teacher).sequence)
    errors = []
    with torch.no_grad():
        hidden = [student.get_input_embeddings()(b.input_ids) for b in cache]
        for i, block in enumerate(decoder_blocks(student)):
            hidden = [run_block(block, h, b.block_kwargs) for h, b in zip(hidden, cache)]
            errors.append(float(sum(((h - b.teacher[i + 1])[b.tokens] ** 2).mean() for h, b in zip(hidden, cache))))
    return errors


def test_block_cache_matches_the_full_forward(teacher_student, batches):
    teacher, _ = teacher_student
    data, _ = batches
    cache = capture_teacher(teacher, data, 2, torch.device("cpu"), atomic(teacher).sequence)
    assert len(cache) == 2 and len(cache[0].teacher) == 3
    b = cache[1]
    with torch.no_grad():
        full = teacher.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                  position_ids=position_ids_for(b.attention_mask)).last_hidden_state
        hidden = teacher.get_input_embeddings()(b.input_ids)
        for block in decoder_blocks(teacher):
            hidden = run_block(block, hidden, b.block_kwargs)
        torch.testing.assert_close(teacher.base_model.norm(hidden), full)


def test_a_bf16_student_aligns_to_a_float32_teachers_cache(teacher_student, batches):
    """trainer.precision=bf16-true compresses bf16 weights, while the teacher may be float32 (the
    compression table keeps a float32 copy): its cached rotary cos/sin must not turn the bf16
    block's queries and keys, and not its values, to float32."""
    teacher, student = teacher_student
    data, _ = batches
    student = copy.deepcopy(student).to(torch.bfloat16)
    cache = capture_teacher(teacher, data, 1, torch.device("cpu"), atomic(teacher).sequence)[0]
    hidden = student.get_input_embeddings()(cache.input_ids)
    with torch.no_grad():
        out = run_block(decoder_blocks(student)[0], hidden, cache.block_kwargs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), run_block(decoder_blocks(student.float())[0], hidden.float(),
                                                      cache.block_kwargs), atol=0.1, rtol=0.05)
    module = ProgressiveAlignmentModule(atomic(copy.deepcopy(student).to(torch.bfloat16)), teacher, data, num_batches=2,
                                        steps_per_layer=3, lr=1e-3)
    trainer(6, precision="bf16-true").fit(module)
    assert [r["layer"] for r in module.layer_reports] == [0, 1]


def test_only_the_current_blocks_factors_change(teacher_student, batches):
    teacher, student = teacher_student
    student = copy.deepcopy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    module = ProgressiveAlignmentModule(atomic(student), teacher, batches[0], num_batches=4, steps_per_layer=10, lr=1e-2)
    trainer(5).fit(module)  # stop inside block 0
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    factors_0 = {k for k in before if k.startswith("model.layers.0.") and k.endswith((".down.weight", ".up.weight"))}
    assert changed == factors_0 and len(factors_0) == 14  # 7 low-rank layers x 2 factors


def test_each_block_error_falls_and_end_to_end_errors_fall(teacher_student, batches):
    teacher, student = teacher_student
    data, _ = batches
    student = copy.deepcopy(student)
    errors_before = hidden_errors(teacher, student, data)
    module = ProgressiveAlignmentModule(atomic(student), teacher, data, num_batches=4, steps_per_layer=30, lr=3e-3)
    trainer(module.total_steps).fit(module)
    assert [r["layer"] for r in module.layer_reports] == [0, 1]
    for report in module.layer_reports:
        assert report["mse_after"] < report["mse_before"] and report["reverted"] == 0
    errors_after = hidden_errors(teacher, student, data)
    assert all(a < b for a, b in zip(errors_after, errors_before)), (errors_before, errors_after)
    assert all(p.requires_grad for p in student.parameters())  # handed back trainable


def test_a_block_made_worse_gets_its_starting_factors_back(teacher_student, batches):
    teacher, student = teacher_student
    student = copy.deepcopy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    module = ProgressiveAlignmentModule(atomic(student), teacher, batches[0], num_batches=4, steps_per_layer=3, lr=5.0,
                                        scheduler="constant")
    trainer(module.total_steps).fit(module)  # an absurd learning rate wrecks every block
    assert [r["reverted"] for r in module.layer_reports] == [1, 1]
    for report in module.layer_reports:
        assert report["mse_after"] == pytest.approx(report["mse_before"])
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def test_closed_form_matches_torch_lstsq():
    torch.manual_seed(0)
    Z = torch.randn(5, 200, dtype=torch.float64)
    Y = torch.randn(7, 200, dtype=torch.float64)
    expected = torch.linalg.lstsq(Z.T, Y.T).solution.T
    torch.testing.assert_close(refit_left_factor(Z @ Z.T, Y @ Z.T, ridge=0.0), expected)


def test_progressive_lstsq_lowers_every_block_error(teacher_student, batches):
    teacher, student = teacher_student
    data, _ = batches
    student = copy.deepcopy(student)
    errors_before = hidden_errors(teacher, student, data)
    cache = capture_teacher(teacher, data, 4, torch.device("cpu"), atomic(teacher).sequence)
    reports = progressive_lstsq(teacher, student, cache, ridge=1e-6)
    assert [r["layer"] for r in reports] == [0, 1]
    assert all(r["mse_after"] < r["mse_before"] for r in reports)
    assert all(a < b for a, b in zip(hidden_errors(teacher, student, data), errors_before))
    # The same refit through the offloading path (alignment.offload_states: teacher_at brings each
    # state to the batch's device). On this CPU-only machine the states are on the CPU either way,
    # so where they live is a GPU check (experiments/gpu_check.py), not this test's.
    offloaded = copy.deepcopy(teacher_student[1])
    cache = capture_teacher(teacher, data, 4, torch.device("cpu"), atomic(teacher).sequence, offload=True)
    untimed = [{k: v for k, v in r.items() if "second" not in k and not k.endswith("_s")} for r in reports]
    again = progressive_lstsq(teacher, offloaded, cache, ridge=1e-6)
    assert [{k: r[k] for k in u} for r, u in zip(again, untimed)] == untimed
    for key, value in student.state_dict().items():
        assert torch.equal(offloaded.state_dict()[key], value), key


def _real_token_inputs(model, name, data):
    """The input of sub-layer ``name`` on the real tokens of ``data``, from a plain full forward
    (no block cache): what the re-fit must have seen, computed independently of it."""
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            for b in data:
                mask = b["attention_mask"]
                captured_before = len(captured)
                model.base_model(input_ids=b["input_ids"], attention_mask=mask,
                                 position_ids=position_ids_for(mask), use_cache=False)
                captured[captured_before] = captured[captured_before][mask.bool()].double()
    finally:
        handle.remove()
    return torch.cat(captured)


def test_lstsq_refits_on_the_students_inputs_not_the_teachers(teacher_student, batches):
    """Block 1's q_proj (the first layer its re-fit solves) gets A = argmin ||A B X_s - W X_t||
    with X_s its input in the student whose block 0 is already re-fitted, and X_t its input in
    the teacher: what makes the method progressive. Solved here by torch.linalg.lstsq."""
    teacher, student = teacher_student
    data, _ = batches
    student = copy.deepcopy(student)
    cache = capture_teacher(teacher, data, 4, torch.device("cpu"), atomic(teacher).sequence)
    reports = progressive_lstsq(teacher, student, cache, ridge=0.0)
    assert [r["reverted"] for r in reports] == [0, 0]
    name = "model.layers.1.self_attn.q_proj"
    xs, xt = _real_token_inputs(student, name, data), _real_token_inputs(teacher, name, data)
    assert (xs - xt).abs().max() > 1e-3  # block 0 was compressed: the two inputs differ
    layer, W = student.get_submodule(name), teacher.get_submodule(name).weight.double()
    Z, Y = xs @ layer.down.weight.double().T, xt @ W.T
    expected = torch.linalg.lstsq(Z, Y).solution.T
    torch.testing.assert_close(layer.up.weight.double(), expected.to(layer.up.weight.dtype).double(),
                               rtol=1e-4, atol=1e-5)
    on_teacher_inputs = torch.linalg.lstsq(xt @ layer.down.weight.double().T, Y).solution.T
    assert (expected - on_teacher_inputs).abs().max() > 1e-3  # the test can tell the two apart


def test_an_lstsq_refit_that_raises_a_blocks_error_is_undone_bit_for_bit(teacher_student, batches):
    """A ridge far above the Gram's scale shrinks every A towards 0, so each block's error rises:
    each block's factors come back exactly as they were, and the report says reverted."""
    teacher, student = teacher_student
    data, _ = batches
    student = copy.deepcopy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    reports = progressive_lstsq(teacher, student, capture_teacher(teacher, data, 4, torch.device("cpu"), atomic(teacher).sequence),
                                ridge=1e6)
    assert [r["reverted"] for r in reports] == [1, 1]
    assert all(r["mse_after"] == r["mse_before"] for r in reports)
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


class Kill(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 9:
            raise RuntimeError("killed")


def test_resume_continues_from_the_checkpointed_block(teacher_student, batches, tmp_path):
    teacher, student = teacher_student
    data, _ = batches
    cfg = AlignmentConfig(method="progressive", batches=4, steps_per_layer=6, lr=3e-3)
    uninterrupted = copy.deepcopy(student)
    align(cfg, atomic(uninterrupted), teacher, data, output_dir=tmp_path / "a")

    resumed = copy.deepcopy(student)

    def killed(**kw):
        return L.Trainer(**{**kw, "callbacks": kw["callbacks"] + [Kill()]}, accelerator="cpu", devices=1,
                         enable_progress_bar=False, enable_model_summary=False)

    with pytest.raises(RuntimeError, match="killed"):
        align(cfg, atomic(resumed), teacher, data, trainer_factory=killed, output_dir=tmp_path / "b")
    assert (tmp_path / "b" / "alignment" / "last.ckpt").is_file()  # written after block 0 (step 6)
    out = align(cfg, atomic(resumed), teacher, data, output_dir=tmp_path / "b")
    assert out["align/layers"] == 1  # only block 1 was left
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_bad_inputs_fail_clearly(teacher_student, batches):
    teacher, student = teacher_student
    with pytest.raises(AlignmentError, match="no low-rank layers"):
        check_alignable(teacher, copy.deepcopy(teacher))
    deeper = build_llama(teacher.config.vocab_size - 1, hidden_size=32, num_layers=3, num_heads=4,
                         num_kv_heads=2, intermediate_size=64, max_len=20)
    with pytest.raises(AlignmentError, match="teacher has 3 decoder blocks, student 2"):
        check_alignable(deeper, student)
    wider = build_llama(teacher.config.vocab_size - 1, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, intermediate_size=96, max_len=20)
    with pytest.raises(AlignmentError, match=r"layers.0.mlp.down_proj: teacher maps 96->32, student 64->32"):
        check_alignable(wider, student)
    broken = copy.deepcopy(teacher)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    module = ProgressiveAlignmentModule(atomic(copy.deepcopy(student)), broken, batches[0], num_batches=2, steps_per_layer=4)
    with pytest.raises(FloatingPointError, match="at block 0, step 0 of 4"):
        trainer(8).fit(module)


def test_config_rejects_alignment_without_low_rank_compression(tmp_path):
    cfg = compose_config(["compression=wanda", "alignment=progressive"], tmp_path)
    with pytest.raises(ConfigError, match="alignment=progressive refines low-rank factors, but compression.method=wanda"):
        validate(cfg)
    with pytest.raises(ConfigError, match="alignment.steps_per_layer=0"):
        validate(compose_config(["compression=odllm", "alignment=progressive", "alignment.steps_per_layer=0"], tmp_path))


def test_the_closed_form_runs_where_the_runs_trainer_runs(teacher_student, batches):
    # Lightning's teardown leaves the student on the CPU after every test pass, so the lstsq
    # path must ask the run's Trainer for its device (on this CPU-only machine the devices
    # agree; what can fail here is not asking).
    teacher, student = teacher_student
    student, built = copy.deepcopy(student), []

    def trainers(**overrides):
        built.append(L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False,
                               enable_model_summary=False, **overrides))
        return built[-1]

    out = align(AlignmentConfig(method="progressive_lstsq", batches=2), atomic(student), teacher, batches[0],
                trainer_factory=trainers)
    assert len(built) == 1 and out["align/layers"] == 2
    assert {p.device for p in student.parameters()} == {built[0].strategy.root_device}


@pytest.mark.parametrize("alignment", ["progressive", "progressive_lstsq"])
def test_pipeline_compress_align_test(alignment, tmp_path):
    overrides = ["compression=odllm", f"alignment={alignment}", "ratio=0.4", "model.hidden_size=16",
                 "model.intermediate_size=32", "dataset.max_len=20", "compression.calib_batches=2",
                 "alignment.batches=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "logger=none",
                 "evaluation.popularity_baseline=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    if alignment == "progressive":
        overrides.append("alignment.steps_per_layer=3")
    metrics = run_task(compose_config(overrides, tmp_path))
    for key in ("stages/compressed/test/ndcg@10", "test/ndcg@10", "time/align_s", "align/mean_mse_after"):
        assert key in metrics, key
    assert metrics["align/layers"] == 2
    assert metrics["align/mean_mse_after"] < metrics["align/mean_mse_before"]
    assert (tmp_path / "alignment_layers.csv").read_text().count("\n") == 3
    assert json.loads((tmp_path / "model" / "compression.json").read_text())["alignment"] == alignment
    assert (tmp_path / "alignment" / "last.ckpt").is_file() == (alignment == "progressive")

    # The report's OD-LLM table shows the aligned cell with its alignment time.
    from recsys_compress.reporting import report

    assert report.main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"| odllm + {alignment} |" in text
    interval = f"[{metrics['retention/ndcg@10_ci_low']:.3f}, {metrics['retention/ndcg@10_ci_high']:.3f}]"
    assert f"| 0.4 | {metrics['retention/ndcg@10']:.3f} {interval} ({metrics['time/align_s']:.0f} s) |" in text
