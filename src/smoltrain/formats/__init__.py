"""Models in and out: Hugging Face folders and the key map (hf.py, model_io.py), GGUF written
for llama.cpp and read back (gguf.py, model_io.py)."""
