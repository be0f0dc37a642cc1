"""GGUF export of the bundled SmolLM2-135M-Instruct, per dtype: file size, seconds to write,
and how close transformers' and llama.cpp's runs of the file come to our f32 model (max
|logits - ours| / max |ours| over a few prompts, and how many of 16 greedy tokens agree).

Usage: python -m bench.gguf [--dtypes f32,f16,bf16,q8_0] [--tokens 16]"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from smoltrain.generate import generate

PROMPTS = [
    "Gravity is the force that",
    "def fibonacci(n):",
    "Once upon a time, there was a little girl named",
    "The capital of France is Paris. The capital of Germany is",
]
RUNNER = Path(__file__).resolve().parents[1] / "tests" / "llama_cpp_run.py"


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def relative_error(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    return ((theirs - ours).abs().max() / ours.abs().max()).item()


def main() -> None:
    from transformers import AutoModelForCausalLM

    from smoltrain.formats.gguf import gguf_dtype, write_gguf
    from smoltrain.formats.model_io import load_model
    from smoltrain.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", default="f32,f16,bf16,q8_0")
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    ours, tokenizer = load_model("smollm2"), load_tokenizer("smollm2")
    reference = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            logits = ours(ids).logits[0]
        reference[prompt] = (
            ids,
            logits,
            generate(ours, ids, max_new_tokens=args.tokens)[0, ids.shape[1] :].tolist(),
        )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in [gguf_dtype(d) for d in args.dtypes.split(",")]:
            path = Path(tmp) / f"smollm2-{dtype}.gguf"
            start = time.perf_counter()
            write_gguf(ours, path, tokenizer, dtype, name="smollm2")
            seconds = time.perf_counter() - start
            theirs = AutoModelForCausalLM.from_pretrained(
                tmp, gguf_file=path.name, dtype=torch.float32
            ).eval()
            hf_error, cpp_error, hf_agree, cpp_agree = 0.0, 0.0, [], []
            for prompt, (ids, logits, greedy) in reference.items():
                with torch.no_grad():
                    hf_error = max(hf_error, relative_error(theirs(ids).logits[0], logits))
                    hf_new = theirs.generate(ids, max_new_tokens=args.tokens, do_sample=False)[
                        0, ids.shape[1] :
                    ]
                hf_agree.append(agreement(hf_new.tolist(), greedy))
                out = Path(tmp) / "llama_cpp.npz"
                run = [
                    sys.executable,
                    str(RUNNER),
                    str(path),
                    str(out),
                    "--text",
                    prompt,
                    "--greedy",
                    str(args.tokens),
                ]
                subprocess.run(run, check=True)
                with np.load(out) as result:
                    cpp_error = max(cpp_error, relative_error(torch.from_numpy(result["logits"]), logits))
                    cpp_agree.append(agreement(result["greedy"].tolist(), greedy))
            rows.append(
                (dtype, path.stat().st_size / 2**20, seconds, hf_error, cpp_error, hf_agree, cpp_agree)
            )
            del theirs
            path.unlink()
    print(f"SmolLM2-135M-Instruct exported; greedy agreement over {args.tokens} tokens per prompt:")
    print(f"  prompts: {PROMPTS}")
    print(
        "| dtype | MiB | write s | transformers rel. err | llama.cpp rel. err "
        "| greedy agree (transformers) | greedy agree (llama.cpp) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for dtype, mib, seconds, hf_error, cpp_error, hf_agree, cpp_agree in rows:
        print(
            f"| {dtype} | {mib:,.1f} | {seconds:.1f} | {hf_error:.2e} | {cpp_error:.2e} | "
            f"{'/'.join(map(str, hf_agree))} | {'/'.join(map(str, cpp_agree))} |"
        )


if __name__ == "__main__":
    main()
