"""smoltrain: train SmolLM2-class Llama models, in and out of the Hugging Face ecosystem."""

__version__ = "0.1.0"
