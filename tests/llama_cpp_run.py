"""Run a GGUF in llama.cpp (llama-cpp-python), in a process of its own so that its threads and
libraries never meet torch's: the ids it reads a text as, the text it decodes them to, its
logits for them and its greedy continuation, saved to an .npz. `without_extra_buffers` is
shared with bench/decode.py."""

import argparse

import llama_cpp.llama_cpp as llama_lib
import numpy as np
from llama_cpp import Llama


def without_extra_buffers() -> None:
    """Models loaded after this use no "extra" weight buffers (the AMX and repacked layouts):
    on Sapphire Rapids CPUs llama.cpp's AMX matmul segfaults on q8_0 weights
    (ggml-org/llama.cpp#20824, seen here with 0.3.36, and on q4_0/q4_1 too); the plain CPU path
    computes the same results."""
    defaults = llama_lib.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_lib.llama_model_default_params = params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("out")
    parser.add_argument("--text", required=True)
    parser.add_argument("--greedy", type=int, default=0, help="new tokens to decode greedily after the text")
    args = parser.parse_args()

    without_extra_buffers()
    llm = Llama(model_path=args.gguf, logits_all=True, n_ctx=512, n_threads=2, verbose=False)
    ids = llm.tokenize(args.text.encode(), add_bos=False, special=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    greedy = []
    for _ in range(args.greedy):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([greedy[-1]])
    decoded = llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
    np.savez(
        args.out, ids=np.array(ids), logits=logits, greedy=np.array(greedy, dtype=np.int64), decoded=decoded
    )


if __name__ == "__main__":
    main()
