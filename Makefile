# Common tasks; every target is a thin wrapper over a documented command. `make help` lists them.
# python3, as in the README: it exists wherever Python 3 does (plain `python` may not).
PY ?= python3
.DEFAULT_GOAL := help

.PHONY: help install test mutation-check gpu-check train bench-overhead bench-throughput bench-compress bench-ddp odllm-table allocation-table mra-curve id-only marc marc-report cold-seeds cold-itembatch cold-export proxy-marc clean

help:               ## list the targets and what each runs
	@grep -E '^[a-z][a-z0-9-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z0-9-]+):[^#]*## (.*)/  \1\t\2/' | expand -t 20

install:            ## install the package with test extras (torch first, see README)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"

test:               ## the test suite (what CI runs)
	$(PY) -m pytest

mutation-check:     ## break the code with each known fault in a copy; fails if the tests miss one (CI runs it)
	$(PY) experiments/mutation_check.py

gpu-check:          ## the paper pipeline on one CUDA GPU in < 8 min, figures in gpu_check.json (refuses without CUDA)
	$(PY) experiments/gpu_check.py --out gpu_check.json

train:              ## the default run: llama_tiny on the vendored ml-latest-small
	$(PY) train.py

bench-overhead:     ## Lightning vs a plain PyTorch loop, time per epoch
	$(PY) experiments/bench_lightning_overhead.py

bench-throughput:   ## training tokens/s of llama_tiny and smollm2_135m
	$(PY) experiments/bench_throughput.py

bench-compress:     ## SmolLM2 compression time, calibration vs factorisation, float32 vs float64 Gram products
	$(PY) experiments/bench_compress.py --model smollm2_135m --calib-batches 2 4 --rounds 3 dataset=ml_100k

bench-ddp:          ## DDP (2 gloo processes) vs single-process epoch time on ML-100K
	$(PY) experiments/bench_ddp.py --rounds 3 dataset=ml_100k trainer.max_epochs=2

odllm-table:        ## OD-LLM methods x ratios x alignment on llama_tiny/ML-1M (one base model), then its report
	$(PY) train.py -m experiment=odllm_table_ml1m hydra.sweep.dir=outputs/odllm_table_ml1m/sweep
	$(PY) -m recsys_compress.reporting.report outputs/odllm_table_ml1m/sweep --out outputs/odllm_table_ml1m/report

# Issue 18: one trained base per model (trained here when its folder holds no metrics.json), then
# every allocation x ratio x alignment on that base in one invocation, paired with uniform by user.
ALLOC_OUT := outputs/allocation
ALLOCATIONS ?= uniform global_relative zero_sum
allocation-table:   ## rank allocations (uniform, global_relative, zero_sum on the training and on the validation gradient) x 0.3/0.5 x progressive on llama_tiny/ML-1M and SmolLM2/ML-100K
	test -f $(ALLOC_OUT)/ml1m_llama_tiny/metrics.json || $(PY) train.py experiment=ml1m_llama_tiny logger=csv trainer.max_time=00:00:45:00 hydra.run.dir=$(ALLOC_OUT)/ml1m_llama_tiny
	$(PY) -m recsys_compress.tasks.compression_table $(ALLOC_OUT)/ml1m_llama_tiny --methods odllm --ratios 0.3 0.5 --allocations $(ALLOCATIONS) --alignments none progressive --calib-batches 16 --heldout-batches 4 --out $(ALLOC_OUT)/ml1m_llama_tiny.json
	$(PY) -m recsys_compress.tasks.compression_table $(ALLOC_OUT)/ml1m_llama_tiny --methods odllm --ratios 0.3 0.5 --allocations uniform zero_sum --alignments none progressive --calib-batches 16 --heldout-batches 4 --out $(ALLOC_OUT)/ml1m_llama_tiny_zs_val.json compression.gradient_split=val
	test -f $(ALLOC_OUT)/ml100k_smollm2_lora/metrics.json || $(PY) train.py experiment=ml100k_smollm2_lora logger=csv hydra.run.dir=$(ALLOC_OUT)/ml100k_smollm2_lora
	$(PY) -m recsys_compress.tasks.compression_table $(ALLOC_OUT)/ml100k_smollm2_lora --methods odllm --ratios 0.3 0.5 --allocations $(ALLOCATIONS) --alignments none progressive --calib-batches 64 --heldout-batches 16 --out $(ALLOC_OUT)/ml100k_smollm2_lora.json alignment.lr=1e-4
	$(PY) -m recsys_compress.tasks.compression_table $(ALLOC_OUT)/ml100k_smollm2_lora --methods odllm --ratios 0.3 0.5 --allocations uniform zero_sum --alignments none progressive --calib-batches 64 --heldout-batches 16 --out $(ALLOC_OUT)/ml100k_smollm2_lora_zs_val.json alignment.lr=1e-4 compression.gradient_split=val

mra-curve:          ## the MRA curve: SmolLM2 layers x {linear, pca} probes on ML-1M
	$(PY) train.py -m experiment=mra_curve_ml1m hydra.sweep.dir=outputs/mra_curve_ml1m/sweep

id-only:            ## the ID-only CTR baseline on ML-1M
	$(PY) train.py task=mra_probe dataset=ml_1m probe.compressor=none hydra.run.dir=outputs/mra_curve_ml1m/id_only

marc:               ## MARC (bottleneck, and + HSIC) on ML-1M
	$(PY) train.py -m experiment=marc_ml1m hydra.sweep.dir=outputs/marc_ml1m/sweep

marc-report: mra-curve id-only marc   ## MRA curve with ID-only and MARC as references
	$(PY) -m recsys_compress.reporting.report outputs/mra_curve_ml1m outputs/marc_ml1m --out outputs/marc_ml1m/report

cold-seeds:         ## cold-item ML-1M, seeds 0-2: probes, ID-only, MARC, fresh models on their codes; paired report
	$(PY) train.py -m experiment=mra_cold_ml1m probe.layer=0,15,30 seed=0,1,2 hydra.sweep.dir=outputs/cold_seeds/linear
	$(PY) train.py -m experiment=mra_cold_ml1m probe.compressor=none probe.layer=0 seed=0,1,2 hydra.sweep.dir=outputs/cold_seeds/id_only
	$(PY) train.py -m task=marc dataset=ml_1m ctr.split_by=item seed=0,1,2 hydra.sweep.dir=outputs/cold_seeds/marc
	for s in 0 1 2; do \
	  $(PY) -m recsys_compress.tasks.evaluate_codes outputs/cold_seeds/linear/$$((6 + s)) && \
	  $(PY) -m recsys_compress.tasks.evaluate_codes outputs/cold_seeds/marc/$$s marc.deploy_noise=true || exit 1; \
	done
	$(PY) -m recsys_compress.reporting.report outputs/cold_seeds --out outputs/cold_seeds/report

cold-itembatch:     ## cold-item ML-1M, seeds 0-2: probes on random vs item-grouped batches, MARC with item-id dropout, fresh models on codes
	$(PY) train.py -m experiment=mra_cold_ml1m probe.layer=0,30 seed=0,1,2 hydra.sweep.dir=outputs/cold_itembatch/linear
	$(PY) train.py -m experiment=mra_cold_ml1m probe.layer=0,30 ctr.batch_by=item seed=0,1,2 hydra.sweep.dir=outputs/cold_itembatch/linear_itembatch
	$(PY) train.py -m experiment=mra_cold_ml1m probe.compressor=none probe.layer=0 ctr.item_id_dropout=0.5 seed=0,1,2 hydra.sweep.dir=outputs/cold_itembatch/id_only
	$(PY) train.py -m task=marc dataset=ml_1m ctr.split_by=item ctr.item_id_dropout=0.5 seed=0,1,2 hydra.sweep.dir=outputs/cold_itembatch/marc
	for s in 0 1 2; do \
	  $(PY) -m recsys_compress.tasks.evaluate_codes outputs/cold_itembatch/marc/$$s ctr.batch_by=item && \
	  $(PY) -m recsys_compress.tasks.evaluate_codes outputs/cold_itembatch/linear/$$((3 + s)) && \
	  $(PY) -m recsys_compress.tasks.evaluate_codes outputs/cold_itembatch/linear_itembatch/$$((3 + s)) || exit 1; \
	done
	$(PY) -m recsys_compress.reporting.report outputs/cold_itembatch --out outputs/cold_itembatch/report

cold-export:        ## cold-item ML-1M, seeds 0-4: MARC deployed on its 8 (or 4) most informative code dims vs all 32, MARC at dim 8, the probes
	$(PY) train.py -m experiment=mra_cold_ml1m probe.layer=0,30 seed=0,1,2,3,4 hydra.sweep.dir=outputs/cold_export/linear
	$(PY) train.py -m experiment=mra_cold_ml1m probe.layer=0,30 ctr.batch_by=item seed=0,1,2,3,4 hydra.sweep.dir=outputs/cold_export/linear_itembatch
	$(PY) train.py -m experiment=mra_cold_ml1m probe.compressor=none probe.layer=0 ctr.item_id_dropout=0.5 seed=0,1,2,3,4 hydra.sweep.dir=outputs/cold_export/id_only
	$(PY) train.py -m task=marc dataset=ml_1m ctr.split_by=item ctr.item_id_dropout=0.5 seed=0,1,2,3,4 hydra.sweep.dir=outputs/cold_export/marc
	$(PY) train.py -m task=marc dataset=ml_1m ctr.split_by=item ctr.item_id_dropout=0.5 marc.dim=8 seed=0,1,2 hydra.sweep.dir=outputs/cold_export/marc_dim8
	for s in 0 1 2 3 4; do \
	  $(PY) -m recsys_compress.tasks.evaluate_codes outputs/cold_export/marc/$$s ctr.batch_by=item && \
	  for k in 4 8; do $(PY) -m recsys_compress.tasks.evaluate_codes outputs/cold_export/marc/$$s marc.export_dims=$$k ctr.batch_by=item || exit 1; done && \
	  $(PY) -m recsys_compress.tasks.evaluate_codes outputs/cold_export/marc/$$s marc.export_dims=8 || exit 1; \
	done
	for s in 0 1 2; do $(PY) -m recsys_compress.tasks.evaluate_codes outputs/cold_export/marc_dim8/$$s ctr.batch_by=item || exit 1; done
	$(PY) -m recsys_compress.reporting.report outputs/cold_export --out outputs/cold_export/report

# The proxy and its settings: `make proxy-marc PROXY=mrl PROXY_ARGS=proxy.objective=mrl` for another.
# A step whose run folder holds metrics.json is skipped and an interrupted one resumes (resume=auto),
# so after an interruption the same command goes on where it stopped (steps take minutes to half an
# hour each on 2 cores).
PROXY ?= ntp
PROXY_ARGS ?= proxy.objective=ntp proxy.batch_size=16 proxy.steps=150 proxy.val_pairs=512
PROXY_OUT := outputs/proxy_marc
PROXY_LAYERS ?= 30 0 5 10 15 20 25
proxy-marc:         ## cold-item ML-1M, seeds 0-2: a proxy fine-tunes SmolLM2, MARC on its encoder (all dims, its 8 most informative), its MRA curve, the pretrained final layer; paired report
	for s in 0 1 2; do \
	  P=$(PROXY_OUT)/$(PROXY)_s$$s M=$(PROXY_OUT)/marc_$(PROXY)_s$$s; \
	  { test -f $$P/metrics.json || $(PY) train.py task=proxy dataset=ml_1m ctr.split_by=item $(PROXY_ARGS) seed=$$s logger=csv resume=auto hydra.run.dir=$$P; } && \
	  { test -f $$M/metrics.json || $(PY) train.py task=marc dataset=ml_1m ctr.split_by=item ctr.item_id_dropout=0.5 representation.encoder_run=$$P seed=$$s logger=csv resume=auto hydra.run.dir=$$M; } && \
	  { test -f "$$M/evaluate_codes/marc.export_dims=8/metrics.json" || $(PY) -m recsys_compress.tasks.evaluate_codes $$M marc.export_dims=8; } && \
	  { test -f $(PROXY_OUT)/mra_pre_s$$s/layer30/metrics.json || $(PY) train.py experiment=mra_cold_ml1m probe.layer=30 seed=$$s logger=csv resume=auto hydra.run.dir=$(PROXY_OUT)/mra_pre_s$$s/layer30; } || exit 1; \
	  for l in $(PROXY_LAYERS); do \
	    test -f $(PROXY_OUT)/mra_$(PROXY)_s$$s/layer$$l/metrics.json || $(PY) train.py experiment=mra_cold_ml1m probe.layer=$$l representation.encoder_run=$$P seed=$$s logger=csv resume=auto hydra.run.dir=$(PROXY_OUT)/mra_$(PROXY)_s$$s/layer$$l || exit 1; \
	  done; \
	done
	$(PY) -m recsys_compress.reporting.report $(foreach s,0 1 2,$(PROXY_OUT)/$(PROXY)_s$(s) $(PROXY_OUT)/marc_$(PROXY)_s$(s) $(PROXY_OUT)/mra_$(PROXY)_s$(s) $(PROXY_OUT)/mra_pre_s$(s)) --out $(PROXY_OUT)/report_$(PROXY)

clean:              ## remove outputs/, multirun/ and the pytest cache (not .cache/: cached models and data)
	rm -rf outputs multirun .pytest_cache
