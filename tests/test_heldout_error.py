"""Calibration counts its tokens, and the output error is also measured on users it never saw."""

from __future__ import annotations

import logging

from recsys_compress.compression.calibration import batch_budget, split_calibration
from recsys_compress.data.datamodule import NextItemDataModule
from recsys_compress.tasks.runner import run_task
from recsys_compress.tasks.compose import compose_config

from conftest import SMALL

TINY = ["compression=odllm", "ratio=0.5", "model.hidden_size=16", "model.intermediate_size=32",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "logger=none", "evaluation.popularity_baseline=false"]


def test_held_out_batches_hold_only_users_outside_calibration():
    # train_windows=all: a user has several windows, so a later batch can hold a calibration user.
    dm = NextItemDataModule("grouplens_csv", SMALL, max_len=5, train_windows="all", batch_size=64)
    dm.setup()
    calibration, heldout = split_calibration(dm.train_dataloader(), calib_batches=3, heldout_batches=4)
    calibrated = {int(u) for b in calibration for u in b["user"]}
    held = [int(u) for b in heldout for u in b["user"]]
    assert len(calibration) == 3 and len(heldout) == 4 and held
    assert not calibrated & set(held)
    later = [int(u) for b in list(dm.train_dataloader())[3:7] for u in b["user"]]
    assert len(held) < len(later) and set(later) & calibrated  # rows were removed, not whole batches
    for b in heldout:
        assert b["input_ids"].shape[0] == b["attention_mask"].shape[0] == b["user"].shape[0]


def test_a_split_too_small_for_both_keeps_their_proportion_and_a_held_out_batch(tmp_path, caplog):
    assert batch_budget(None, 16, 4) == (16, 4) and batch_budget(20, 16, 4) == (16, 4)
    assert batch_budget(5, 16, 4) == (4, 1) and batch_budget(18, 16, 4) == (14, 4)
    assert batch_budget(1, 16, 4) == (1, 0) and batch_budget(3, 16, 0) == (16, 0)
    # ml-latest-small, one window per user: 5 training batches of 128 against the default 16 + 4
    with caplog.at_level(logging.WARNING):
        metrics = run_task(compose_config(TINY, tmp_path))
    assert "the training split holds 5 batches, fewer than compression.calib_batches + " \
           "compression.heldout_batches = 20: calibrating on 4 and holding out 1" in caplog.text
    assert metrics["compression/calib_batches"] == 4 and metrics["compression/heldout_tokens"] > 0
    assert metrics["compression/heldout_rel_output_error"] > 0


def test_enough_tokens_give_close_figures_and_too_few_warn_and_fit_the_calibration_tokens(tmp_path, caplog):
    enough = run_task(compose_config([*TINY, "dataset.max_len=20", "compression.calib_batches=2",
                                          "compression.heldout_batches=2"], tmp_path / "enough"))
    assert enough["compression/calib_tokens"] > 1000 > 32 and enough["compression/heldout_tokens"] > 1000
    assert enough["compression/rank_deficient_layers"] == 0
    ratio = enough["compression/heldout_rel_output_error"] / enough["compression/mean_rel_output_error"]
    assert 0.8 < ratio < 1.25, ratio

    with caplog.at_level(logging.WARNING):
        few = run_task(compose_config([*TINY, "dataset.max_len=8", "dataset.batch_size=1",
                                           "compression.calib_batches=1", "compression.heldout_batches=4"],
                                          tmp_path / "few"))
    assert few["compression/calib_tokens"] <= 9 < 16  # one window of up to 9 items: fewer than any layer's inputs
    assert few["compression/rank_deficient_layers"] == 14  # 2 blocks x 7 matrices
    assert "fewer than the 32 input features of the widest targeted layer: 14 of 14 layers" in caplog.text
    # Whitening fits those very tokens: in-sample the error is small, on other users it is not.
    assert few["compression/heldout_rel_output_error"] > 2 * few["compression/mean_rel_output_error"]
    rows = (tmp_path / "few" / "compression_layers.csv").read_text().splitlines()
    assert rows[0].endswith(",heldout_rel_output_error,dense") and len(rows) == 15
