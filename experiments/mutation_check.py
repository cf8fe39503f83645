"""Break the code on purpose, one known fault at a time, and check that the tests notice.

Each fault is an exact text edit of one source file and the tests that must fail under it.
The script copies the repository's tracked files to a temporary folder, applies one fault
there (the checkout is never touched), runs those tests against the copy and reports the
faults the tests let pass ("survivors"). Exit status 1 if any survived, so CI can run it.

    python3 experiments/mutation_check.py             # every fault
    python3 experiments/mutation_check.py --list      # the faults and their tests
    python3 experiments/mutation_check.py resume_ignores_checkpoint marc_loss_drops_kl

The faults are the ones an earlier review found unguarded (resume, MARC's KL term, the
probe's layer, the base-model lock), plus one for each rule the user-facing commands rely on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("RECSYS_DATA_ROOT", REPO.parent / "shared" / "data"))


@dataclass(frozen=True)
class Fault:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


FAULTS = [
    Fault("scorer_reads_the_last_slot", "recsys_compress/models/lit_seqrec.py",
          "return self.model.get_output_embeddings()(hidden[torch.arange(batch, device=hidden.device), last])",
          "return self.model.get_output_embeddings()(hidden[:, -1])",
          ("tests/test_deploy.py::test_attention_and_rotary_run_as_onnxruntime_kernels_and_padding_stays_invisible",)),
    Fault("rotary_cache_rule_dropped", "recsys_compress/deploy/fusions.py",
          "return fuse_cos_sin_cache(model, debug=debug, **kwargs) + from_positions(model, debug=debug, **kwargs)",
          "return fuse_cos_sin_cache(model, debug=debug, **kwargs)",
          ("tests/test_deploy.py::test_attention_and_rotary_run_as_onnxruntime_kernels_and_padding_stays_invisible",)),
    Fault("static_int8_quantises_dynamically", "recsys_compress/deploy/export.py",
          '        if int8 == "dynamic":\n', '        if True:\n',
          ("tests/test_deploy.py::test_static_int8_artefact_matches_eager_on_histories_it_never_calibrated_on",)),
    Fault("per_channel_int8_weights_per_tensor", "recsys_compress/deploy/export.py",
          '    per_channel = weights == "per_channel"\n', "    per_channel = False\n",
          ("tests/test_deploy.py::test_per_channel_int8_weights_keep_the_low_rank_factors_closer_to_eager",)),
    Fault("weight_zero_points_kept", "recsys_compress/deploy/export.py",
          "            drop_zero_weight_zero_points(path)\n", "            pass\n",
          ("tests/test_deploy.py::test_per_channel_int8_weights_keep_the_low_rank_factors_closer_to_eager",)),
    Fault("smoothing_scales_not_folded_into_the_readers", "recsys_compress/deploy/smoothing.py",
          "            w.mul_(scales.to(w.dtype)[None, :])\n", "            pass\n",
          ("tests/test_smoothing.py::test_smoothing_keeps_the_function_and_equalises_ranges_as_the_formula_says",)),
    Fault("smoothing_scales_not_divided_out_of_the_norm", "recsys_compress/deploy/smoothing.py",
          "        params = [producer.weight, getattr(producer, \"bias\", None)]\n", "        params = []\n",
          ("tests/test_smoothing.py::test_smoothing_keeps_the_function_and_equalises_ranges_as_the_formula_says",)),
    Fault("smoothed_model_not_exported", "recsys_compress/deploy/export.py",
          "    graph = recommender.export_graph(exported, max_len)\n", "    graph = recommender.export_graph(model, max_len)\n",
          ("tests/test_smoothing.py::test_a_smoothed_int8_artefact_is_closer_to_the_eager_model",)),
    Fault("encoder_run_ignored", "recsys_compress/tasks/builders.py",
          "            apply_proxy_encoder(encoder, rep.encoder_run)\n", "            pass\n",
          ("tests/test_proxy.py::test_mrl_trains_and_its_saved_encoder_read_through_encoder_run_gives_the_trained_states",)),
    Fault("mrl_trains_the_full_code_only", "recsys_compress/representations/proxy.py",
          "return sum(info_nce(queries[:, :d], keys[:, :d], temperature) for d in mrl_prefixes(queries.shape[1], levels))",
          "return levels * info_nce(queries, keys, temperature)",
          ("tests/test_proxy.py::test_mrl_is_the_sum_of_its_prefix_losses",)),
    Fault("aligned_ranks_pass_break_even", "recsys_compress/compression/allocation.py",
          "if ranks[name] % multiple and raised <= break_even_rank(m, n) and multiple * (m + n) <= slack:",
          "if ranks[name] % multiple and multiple * (m + n) <= slack:",
          ("tests/test_allocation.py::test_alignment_above_a_rank_fails_naming_the_option_and_a_dense_matrix_stays_dense",)),
    Fault("zero_sum_ignores_the_sign", "recsys_compress/compression/allocation.py",
          "heapq.heappush(heaps[delta >= 0], (abs(delta), name))", "heapq.heappush(heaps[True], (abs(delta), name))",
          ("tests/test_allocation.py::test_zero_sum_follows_the_two_heap_rule_by_hand",)),
    Fault("zero_sum_val_split_ignored", "recsys_compress/tasks/train_seqrec.py",
          'gradient_batches = dm.val_dataloader() if compressor.takes_gradients and c.gradient_split == "val"',
          'gradient_batches = None if compressor.takes_gradients and c.gradient_split == "val"',
          ("tests/test_allocation.py::test_zero_sum_composes_through_the_pipeline",)),
    Fault("loss_change_not_whitened", "recsys_compress/compression/low_rank.py",
          "lambda G: torch.linalg.solve_triangular(S, G.double().T, upper=False).T,", "lambda G: G.double(),",
          ("tests/test_allocation.py::test_each_directions_loss_change_is_exact_for_a_loss_linear_in_the_weight",)),
    Fault("timing_ratios_not_paired_by_round", "recsys_compress/evaluation/bootstrap.py",
          "ratios = o / b\n", "ratios = o / b.median()\n",
          ("tests/test_ondevice_bench.py::test_benchmark_rows_pair_the_rounds",)),
    Fault("int8_graph_loses_module_paths", "recsys_compress/deploy/export.py",
          "        carry_module_paths(float_path, path)\n", "",
          ("tests/test_deploy.py::test_the_profile_attributes_every_kernel_to_its_role",)),
    Fault("sequential_skips_propagation", "recsys_compress/compression/sequential.py",
          '        if not names or propagate == "compressed":\n            _propagate(block, calib_inputs + heldout_inputs)',
          '        if not names or propagate == "compressed":\n            pass',
          ("tests/test_sequential.py::test_compressed_propagation_keeps_block_0_and_refits_the_blocks_above",)),
    Fault("statistics_memory_never_checked", "recsys_compress/compression/compressor.py",
          "        if needed > available:", "        if False:",
          ("tests/test_sequential.py::test_statistics_that_would_not_fit_are_refused_with_the_numbers",)),
    Fault("sequential_keeps_every_blocks_stats", "recsys_compress/compression/sequential.py",
          "            del stats, held  # one block's statistics at a time",
          "            reports[-1].__dict__['stats'] = (stats, held)",
          ("tests/test_sequential.py::test_only_one_blocks_statistics_are_alive_at_once",)),
    Fault("sequential_never_trims", "recsys_compress/compression/sequential.py",
          "            release_freed_memory()  # ... and their pages, or the heap's holes grow with depth\n", "",
          ("tests/test_sequential.py::test_each_blocks_statistics_are_freed_and_their_pages_handed_back_before_the_next_block",)),
    Fault("trim_is_a_no_op", "recsys_compress/utils/memory.py", "    trim(0)\n", "",
          ("tests/test_sequential.py::test_releasing_freed_memory_returns_the_heaps_free_pages_to_the_system",)),
    Fault("sequential_not_a_bounded_step", "recsys_compress/compression/sequential.py",
          "@large_allocations_mapped()  # a freed block's statistics and workspace leave the resident set at once\n", "",
          ("tests/test_sequential.py::test_the_sequential_path_runs_as_a_bounded_step",)),
    Fault("resume_ignores_checkpoint", "recsys_compress/tasks/train_seqrec.py",
          "        return str(last)", "        return None",
          ("tests/test_sweeps.py::test_kill_then_resume_gives_the_uninterrupted_result",)),
    Fault("marc_loss_drops_kl", "recsys_compress/marc/marc_module.py",
          "        loss = bce + self.marc.beta * kl", "        loss = bce",
          ("tests/test_marc.py::test_the_kl_weight_beta_pulls_marcs_posterior_towards_the_prior",)),
    Fault("probe_reads_final_layer", "recsys_compress/tasks/mra_probe.py",
          "RepresentationCompressor(None if reps is None else reps[layer],",
          "RepresentationCompressor(None if reps is None else reps[-1],",
          ("tests/test_mra_probe.py::test_a_probe_reads_the_layer_it_names",)),
    Fault("base_model_lock_removed", "recsys_compress/models/base_cache.py",
          "            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)", "            pass",
          ("tests/test_sweeps.py::test_two_concurrent_jobs_needing_one_base_model_train_it_once",)),
    Fault("cache_key_ignores_data_content", "recsys_compress/models/base_cache.py",
          '"data_sha256": content_fingerprint(c["dataset"]["path"], cache_dir),', '"data_sha256": None,',
          ("tests/test_base_cache.py::test_an_edited_data_file_misses_the_cache_and_a_corrupt_entry_is_reported_and_rebuilt",)),
    Fault("sigterm_exits_zero", "recsys_compress/tasks/runner.py",
          "SIGTERM_EXIT = 143\n", "SIGTERM_EXIT = 0\n",
          ("tests/test_user_commands.py::test_sigterm_exits_143_and_resume_continues_with_the_runs_own_config",)),
    Fault("rerun_overwrites_finished_run", "recsys_compress/utils/run_dir.py",
          "        if found:", "        if False:",
          ("tests/test_user_commands.py::test_a_rerun_into_a_finished_run_is_refused_and_resume_refuses_an_override_that_changes_it",)),
    Fault("heldout_users_overlap_calibration", "recsys_compress/compression/calibration.py",
          "        keep = torch.tensor([int(u) not in seen_users for u in batch[\"user\"]], dtype=torch.bool)",
          "        keep = torch.ones(len(batch[\"user\"]), dtype=torch.bool)",
          ("tests/test_heldout_error.py::test_held_out_batches_hold_only_users_outside_calibration",)),
    Fault("loss_predicts_the_current_item", "recsys_compress/models/lit_seqrec.py",
          "return F.cross_entropy(logits.float(), ids[:, 1:][has_target])",
          "return F.cross_entropy(logits.float(), ids[:, :-1][has_target])",
          ("tests/test_fast_dev_run.py::test_a_trained_model_beats_popularity_on_ml_100k",)),
    Fault("lora_unloaded_without_merging", "recsys_compress/models/finetune.py",
          "    merged = wrapper.merge_and_unload()", "    merged = wrapper.unload()",
          ("tests/test_finetune.py::test_merged_lora_model_equals_the_unmerged_peft_model",)),
    Fault("global_allocation_takes_the_worst_direction_first", "recsys_compress/compression/allocation.py",
          "        return -step[2], name, step[1]", "        return step[2], name, step[1]",
          ("tests/test_allocation.py::test_global_whitened_error_is_at_most_uniform_on_the_calibration_tokens",
           "tests/test_allocation.py::test_a_concentrated_spectrum_gets_a_lower_rank_than_a_flat_one")),
    Fault("item_lr_ignored", "recsys_compress/models/lit_base.py",
          '"lr": hp.item_lr or hp.lr}]', '"lr": hp.lr}]',
          ("tests/test_finetune.py::test_item_table_gets_its_own_learning_rate",)),
    Fault("compressed_before_the_precision_cast", "recsys_compress/utils/instantiators.py",
          "    trainer.precision_plugin.convert_module(module)\n", "",
          ("tests/test_compressor.py::test_compression_sees_the_weights_the_run_holds",)),
    Fault("beam_search_leaves_the_trie", "recsys_compress/models/generative.py",
          "valid = children >= 0  # -1: no item continues that way",
          "valid = torch.ones_like(children, dtype=torch.bool)",
          ("tests/test_generative.py::test_no_beam_ever_leaves_the_trie_and_the_beams_are_always_filled",)),
    Fault("beam_search_returns_seen_items", "recsys_compress/models/generative.py",
          "        valid &= remaining[level].gather(1, children.clamp(min=0)) > 0\n", "        pass\n",
          ("tests/test_generative.py::test_seen_items_are_never_returned_and_the_beams_are_filled_from_the_rest",)),
    Fault("beams_see_each_others_tokens", "recsys_compress/models/generative.py",
          "own = (beam_of[:, None] == beam_of[None, :]) & (step_of[None, :] <= step_of[:, None])",
          "own = step_of[None, :] <= step_of[:, None]",
          ("tests/test_generative.py::test_beams_as_wide_as_the_catalogue_return_every_item_in_exact_log_probability_order",)),
    Fault("per_level_bans_tuples_that_are_no_item", "recsys_compress/models/generative.py",
          "valid &= ~(banned.gather(1, item) & (item > 0))", "valid &= ~banned.gather(1, item)",
          ("tests/test_generative.py::test_lc_recs_per_level_decoding_ranks_every_combination_of_seen_codes_and_marks_non_items",)),
    Fault("invalid_tuples_not_counted", "recsys_compress/models/generative.py",
          "update((items == 0)[returned].float())", "update((items < 0)[returned].float())",
          ("tests/test_generative.py::test_the_test_records_the_rate_of_tuples_that_are_no_item_none_with_the_trie",)),
    Fault("step_graph_query_sees_history_padding", "recsys_compress/models/generative.py",
          "history_block = (causal & mask[:, None, :]) | torch.eye", "history_block = causal | torch.eye",
          ("tests/test_generative.py::test_the_exported_artefact_recommends_what_the_eager_model_does",)),
    Fault("checkpoint_of_other_codes_loaded", "recsys_compress/models/generative.py",
          "if saved is not None and saved != self.codes_fingerprint():", "if False:",
          ("tests/test_generative.py::test_a_checkpoint_of_other_item_codes_is_refused_even_when_the_vocabulary_fits",)),
    Fault("step_graph_head_on_3d_input", "recsys_compress/models/generative.py",
          "logits = self.backbone.get_output_embeddings()(picked.reshape(-1, picked.shape[-1]))\n"
          "        return logits.view(picked.shape[0], picked.shape[1], -1)",
          "return self.backbone.get_output_embeddings()(picked)",
          ("tests/test_generative.py::test_the_exported_artefact_recommends_what_the_eager_model_does",)),
    Fault("leftover_collisions_kept_for_the_generative_model", "recsys_compress/tasks/item_index.py",
          "            index = disambiguate_tiger(index)\n", "            pass\n",
          ("tests/test_generative.py::test_items_still_sharing_a_tuple_after_lc_recs_rounds_get_tigers_extra_code_for_the_generative_model",)),
    Fault("calibration_counts_items_not_tokens", "recsys_compress/compression/compressor.py",
          "    return [vars(recommender.sequence(b)) for b in batches]\n",
          "    return [{**vars(recommender.sequence(b)), \"attention_mask\": b[\"attention_mask\"]} for b in batches]\n",
          ("tests/test_generative.py::test_compression_and_alignment_run_on_the_generative_model_through_the_seam",)),
    Fault("smoothing_statistics_with_dropout", "recsys_compress/deploy/export.py",
          "        recommender.eval()  # no dropout in the statistics\n", "",
          ("tests/test_smoothing.py::test_smoothing_statistics_are_taken_without_dropout",)),
    Fault("ntp_head_left_random", "recsys_compress/tasks/proxy.py",
          "        module.pca_head(items.unique(), users.unique())", "        pass",
          ("tests/test_proxy.py::test_contrastive_cosine_and_ntp_train_their_loss_decreases_and_their_code_is_deployed",)),
    Fault("whitening_dropped", "recsys_compress/compression/low_rank.py",
          "        lambda W: W.double() @ S,", "        lambda W: W.double(),",
          ("tests/test_low_rank.py::test_whitened_minimises_output_error_on_its_activations",)),
    # issue 48: faults found where every test passed
    Fault("report_cell_ignores_the_setting", "recsys_compress/reporting/report.py",
          '        cell = Cell(r["_setting"], _method_label(r), r["_alignment"], r["_ratio"])',
          '        cell = Cell(frozenset(), _method_label(r), r["_alignment"], r["_ratio"])',
          ("tests/test_report.py::test_incomparable_runs_never_share_a_cell_and_seeds_pool",)),
    Fault("probe_all_reads_the_final_layer", "recsys_compress/tasks/mra_probe.py",
          "            compressor = RepresentationCompressor(reps[layer], run.probe.compressor, run.probe.dim)",
          "            compressor = RepresentationCompressor(reps[-1], run.probe.compressor, run.probe.dim)",
          ("tests/test_mra_probe.py::test_probe_all_layers_in_one_run_then_the_report_and_bad_inputs",)),
    Fault("recommend_keeps_the_oldest_items", "recsys_compress/deploy/recommend.py",
          "rows.append([self.index[h] for h in history][-self.max_len:])",
          "rows.append([self.index[h] for h in history][:self.max_len])",
          ("tests/test_deploy.py::test_a_history_longer_than_max_len_is_read_as_its_latest_items",)),
    Fault("plain_run_leaves_the_base_cache_empty", "recsys_compress/tasks/train_seqrec.py",
          '    storing = run.base_cache and not cfg.trainer.get("fast_dev_run")',
          '    storing = caching and not cfg.trainer.get("fast_dev_run")',
          ("tests/test_fast_dev_run.py::test_a_compression_sweep_trains_the_base_model_once",)),
    Fault("ctrl_c_in_training_is_a_crash", "recsys_compress/tasks/runner.py",
          "isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt))",
          "False)",
          ("tests/test_user_commands.py::test_ctrl_c_is_one_line_saying_where_the_checkpoint_is_and_exits_130",)),
    Fault("refused_run_folder_kept", "train.py",
          "            discard_refused_run_dir(cfg.paths.output_dir)\n", "",
          ("tests/test_user_commands.py::test_a_config_error_prints_its_message_once_without_a_traceback",)),
    Fault("truncated_data_file_unnoticed", "recsys_compress/data/readers.py",
          '    if line_based and data and not data.endswith(b"\\n"):', "    if False:",
          ("tests/test_readers.py::test_a_file_without_a_final_newline_is_read_with_a_warning_naming_its_last_line",)),
    Fault("file_as_run_folder_unchecked", "recsys_compress/utils/output_dir_check.py",
          "    if blocking is not None:", "    if False:",
          ("tests/test_user_commands.py::test_a_run_folder_that_is_a_file_or_unwritable_fails_in_one_line",)),
    Fault("unwritable_run_folder_unchecked", "recsys_compress/utils/output_dir_check.py",
          "            if not os.access(folder, os.W_OK | os.X_OK):", "            if False:",
          ("tests/test_user_commands.py::test_a_run_folder_that_is_a_file_or_unwritable_fails_in_one_line",)),
    Fault("plain_run_ignores_export_onnx", "recsys_compress/tasks/train_seqrec.py",
          "    elif run.export.onnx and global_rank() == 0:", "    elif False:",
          ("tests/test_deploy.py::test_a_plain_run_with_export_onnx_ships_the_trained_model",)),
    Fault("config_validation_loads_torch", "recsys_compress/compression/config.py",
          "from recsys_compress.compression.names import ALLOCATIONS, DEFAULT_TARGETS, LOW_RANK_METHODS\n",
          "from recsys_compress.compression.allocation import ALLOCATIONS\n"
          "from recsys_compress.compression.names import DEFAULT_TARGETS, LOW_RANK_METHODS\n",
          ("tests/test_user_commands.py::test_a_wrong_value_is_refused_before_torch_lightning_or_transformers_load",)),
    Fault("mra_curves_of_two_datasets_unnamed", "recsys_compress/reporting/report.py",
          """    return lambda r: f" [{r.get('_dataset', '?')}]" if several else \"\"""",
          '    return lambda r: ""',
          ("tests/test_report.py::test_probe_runs_on_two_datasets_are_two_curves_not_two_seeds",)),
    Fault("lcrec_reads_items_out_of_order", "recsys_compress/data/lcrec.py",
          "        for item in sequence:\n", "        for item in reversed(sequence):\n",
          ("tests/test_lcrec.py::test_the_split_is_the_atomic_datamodules_leave_one_out_of_the_same_sequences",)),
    Fault("index_tuple_lengths_unchecked", "recsys_compress/data/lcrec.py",
          "        elif len(tokens) != length:", "        elif False:",
          ("tests/test_lcrec.py::test_a_bad_index_fails_naming_the_file_the_item_and_what_was_expected",)),
    Fault("sinkhorn_codes_not_balanced", "recsys_compress/tokenizers/assign.py",
          "        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) + torch.log(torch.tensor(n / k, dtype=d.dtype))\n",
          "",
          ("tests/test_tokenizers.py::test_sinkhorn_spreads_points_that_all_prefer_one_code_evenly_over_the_codes",)),
    Fault("tiger_extra_code_not_counted", "recsys_compress/tokenizers/assign.py",
          "        seen[t] = position + 1\n", "        seen[t] = 0\n",
          ("tests/test_tokenizers.py::test_tiger_disambiguation_makes_the_published_index_unique",)),
    Fault("lcrec_collision_rounds_do_nothing", "recsys_compress/tokenizers/assign.py",
          "            codes[members, -1] = _last_level(model, residual[members], epsilon, iterations)\n",
          "            pass\n",
          ("tests/test_tokenizers.py::test_codes_read_off_the_rqvae_are_balanced_and_lcrec_rounds_remove_collisions",)),
    Fault("semantic_index_cache_ignores_settings", "recsys_compress/tasks/item_index.py",
          '"semantic": run.semantic.model_dump(), "seed": run.seed}', '"semantic": None, "seed": run.seed}',
          ("tests/test_semantic_ids.py::test_an_index_is_built_cached_by_its_inputs_and_written_in_lc_rec_format",)),
    Fault("loaded_index_collisions_kept", "recsys_compress/tasks/item_index.py",
          "        index = disambiguate_tiger(index)  # the config allows only tiger without an RQ-VAE\n", "",
          ("tests/test_semantic_ids.py::test_the_published_index_is_loaded_and_made_unique_by_tigers_extra_code",)),
    Fault("lstsq_fits_on_the_teachers_inputs", "recsys_compress/alignment/lstsq.py",
          "                        z = xs[name] @ B.T", "                        z = xt[name] @ B.T",
          ("tests/test_alignment.py::test_lstsq_refits_on_the_students_inputs_not_the_teachers",)),
    Fault("lstsq_never_reverts", "recsys_compress/alignment/lstsq.py",
          "            reverted = after >= before", "            reverted = False",
          ("tests/test_alignment.py::test_an_lstsq_refit_that_raises_a_blocks_error_is_undone_bit_for_bit",)),
]


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def apply(fault: Fault, root: Path) -> None:
    path = root / fault.file
    text = path.read_text()
    if text.count(fault.old) != 1:  # the code moved: the fault list must follow it
        raise SystemExit(f"fault {fault.name}: {fault.file} holds {text.count(fault.old)} copies of "
                         f"{fault.old.strip()!r}, expected exactly 1; update experiments/mutation_check.py")
    path.write_text(text.replace(fault.old, fault.new))


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(root), "RECSYS_DATA_ROOT": str(DATA_ROOT), "WANDB_MODE": "offline"}
    env.pop("PROJECT_ROOT", None)
    t0 = time.perf_counter()
    # -n 0: a fault's few tests in this process, so that only a failing test (not a worker
    # start-up error) counts as caught
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *tests], cwd=root,
                         env=env, capture_output=True, text=True)
    return out.returncode, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("faults", nargs="*", help="names of the faults to apply (default: all)")
    parser.add_argument("--list", action="store_true", help="list the faults and their tests")
    parser.add_argument("--clean", action="store_true",
                        help="also run each fault's tests on the unbroken copy first (they must pass)")
    args = parser.parse_args(argv)
    by_name = {f.name: f for f in FAULTS}
    unknown = [n for n in args.faults if n not in by_name]
    if unknown:
        parser.error(f"unknown fault {unknown[0]}; allowed: {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.faults] if args.faults else FAULTS
    if args.list:
        for f in chosen:
            print(f"{f.name}: {f.file}: {f.old.strip()!r} -> {f.new.strip()!r}\n    " + "\n    ".join(f.tests))
        return 0
    survivors = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        for fault in chosen:
            root = Path(tmp) / fault.name
            copy_repo(root)
            if args.clean:
                code, _ = run_tests(root, fault.tests)
                if code != 0:
                    raise SystemExit(f"fault {fault.name}: its tests fail on the unbroken code; fix them first")
            apply(fault, root)
            code, seconds = run_tests(root, fault.tests)
            caught = code != 0
            print(f"{'caught  ' if caught else 'SURVIVED'} {fault.name:32s} {seconds:6.1f} s  ({len(fault.tests)} test)",
                  flush=True)
            if not caught:
                survivors.append(fault.name)
            shutil.rmtree(root, ignore_errors=True)
    print(f"{len(chosen) - len(survivors)} caught, {len(survivors)} survived"
          + (f": {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
