"""One measurement in a fresh process, so each contender's peak memory is its own.
Prints one JSON line. Run by `python -m bench`; usable alone:
    python -m bench.worker train --impl ours --preset tiny --precision bf16
    python -m bench.worker generate --impl hf --batch 8 --precision fp32
    python -m bench.worker train --impl ours --preset smollm2-135m --profile   # where a step's time goes
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from smoltrain.device import measure_peak_flops, sync
from smoltrain.formats.hf import hf_state_dict
from smoltrain.model import CustomLLM
from smoltrain.model.config import get_preset
from smoltrain.model.kernels import prepare_for_training
from smoltrain.perf import keep_freed_memory, lean_malloc_env, relaunch_with_lean_malloc

PROMPT = "The future of AI is"


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def launch_env(args: list[str] | tuple[str, ...]) -> dict[str, str] | None:
    """The environment to start `python -m bench.worker ARGS` in: smoltrain's worker with
    glibc's lean setting from the start, as its own relaunch would give it after importing
    torch (1 s a worker); None (this process's) for transformers' or with `--tune-malloc off`."""
    pairs = set(zip(args[:-1], args[1:], strict=True))  # (option, value)
    if ("--impl", "ours") in pairs and ("--tune-malloc", "off") not in pairs:
        return lean_malloc_env()
    return None


def read_bandwidth(probe: torch.Tensor, reps: int = 5) -> float:
    """Bytes/s read by summing `probe`, a tensor far larger than the caches: the ceiling for
    weight-bound decoding, which reads every weight once per step. Median of `reps`."""
    probe.sum()
    rates = []
    for _ in range(reps):
        sync(probe.device.type)
        start = time.perf_counter()
        probe.sum()
        sync(probe.device.type)
        rates.append(probe.numel() * probe.element_size() / (time.perf_counter() - start))
    return statistics.median(rates)


# aten's matrix products and where their operands sit in `input_shapes` ([a, b] or [a, b, out]
# for mm and bmm; the added tensor first for addmm, addmm_ and baddbmm)
_PRODUCTS = {"aten::mm": 0, "aten::bmm": 0, "aten::addmm": 1, "aten::addmm_": 1, "aten::baddbmm": 1}
_ATTENTION = "scaled_dot_product"
_OPTIMIZER = "Optimizer.step"


def step_time_split(step, steps: int = 2) -> dict:
    """Where a training step's time goes on CPU, from torch's profiler over `steps` calls of
    `step`: each op's own time, grouped by what it runs in: attention (SDPA, whatever it calls),
    the optimizer's step, the matrix products elsewhere (and the FLOP/s they reach), and the
    rest (norms, activations, the loss's softmax, a compiled graph's fused loops). The shares
    sum to 1; the profiler adds a little."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    seconds = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "other": 0.0}
    matmul_flops = 0
    for event in prof.events():
        names, parent = [], event.cpu_parent
        while parent is not None:
            names.append(parent.name)
            parent = parent.cpu_parent
        own = event.self_cpu_time_total / 1e6
        if any(_ATTENTION in n for n in [event.name, *names]):
            seconds["attention"] += own
        elif any(n.startswith(_OPTIMIZER) for n in [event.name, *names]):
            seconds["optimizer"] += own
        elif event.name in _PRODUCTS or any(n in _PRODUCTS for n in names):
            if not any(n in _PRODUCTS for n in names):  # counted once, at the outermost
                first = _PRODUCTS[event.name]
                a, b = event.input_shapes[first : first + 2]
                matmul_flops += 2 * math.prod(a) * b[-1]  # (..., m, k) @ (..., k, n)
            seconds["matmul"] += own
        else:
            seconds["other"] += own
    total = sum(seconds.values())
    split = {name: s / total for name, s in seconds.items()}
    split["step_s"] = total / steps
    split["matmul_flops_per_s"] = matmul_flops / seconds["matmul"] if seconds["matmul"] else 0.0
    return split


def describe_split(result: dict) -> str:
    """The profile's split as one line, with the MFU the step would reach if everything but
    the products took no time (their speed is then the only limit)."""
    split, peak = result["time_split"], result["matmul_peak_flops"]
    shares = ", ".join(f"{name} {split[name]:.1%}" for name in ("matmul", "attention", "optimizer", "other"))
    mfu = result["mfu"]
    return (
        f"step {split['step_s']:.3f} s under the profiler: {shares}; the products run at "
        f"{split['matmul_flops_per_s'] / peak:.0%} of the {peak / 1e9:.0f} GFLOP/s peak; MFU {mfu:.0%}, "
        f"{mfu / split['matmul']:.0%} if the products were the whole step"
    )


def build_pair_model(impl: str, preset: str, device: str, overrides: dict):
    """Both contenders get the same weights: ours initialized with seed 0, copied into HF."""
    torch.manual_seed(0)
    ours = CustomLLM(get_preset(preset, **overrides))
    if impl == "ours":
        return ours.to(device)
    from transformers import LlamaForCausalLM

    theirs = LlamaForCausalLM(ours.config.to_hf())
    theirs.load_state_dict(hf_state_dict(ours), strict=False)
    theirs.tie_weights()
    return theirs.to(device)


def train(args) -> dict:
    if args.impl == "ours" and args.tune_malloc == "on":
        keep_freed_memory()
    overrides = json.loads(args.overrides)
    model = build_pair_model(args.impl, args.preset, args.device, overrides).train()
    if args.impl == "ours":
        model = prepare_for_training(model, args.device, args.precision, args.kernels)
    if args.compile:
        model = torch.compile(model)  # compiles on the first step, timed as compile_s
    # ours: the fused AdamW smoltrain's trainer uses; theirs: PyTorch's default (foreach)
    fused = True if args.impl == "ours" or args.device == "cuda" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=fused)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (args.batch, args.context), generator=gen).to(args.device)
    bf16 = args.precision == "bf16"

    def step() -> torch.Tensor:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16):
            if args.impl == "ours":
                loss = model(ids, labels=ids, return_logits=False).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, compile_s = [], None
    for i in range(args.warmup + args.steps):
        sync(args.device)
        start = time.perf_counter()
        loss = step()
        sync(args.device)
        elapsed = time.perf_counter() - start
        if i == 0 and args.compile:
            compile_s = elapsed
        if i >= args.warmup:
            times.append(elapsed)
    step_s = statistics.median(times)
    peak_memory_mb = _peak_memory_mb(args.device)  # before the matmuls below add theirs
    # The ceiling for MFU, measured right after the timed steps: a shared machine's speed
    # drifts by 10-20% over a bench run, and a peak taken minutes earlier would move the MFU.
    dtype = torch.bfloat16 if bf16 else torch.float32
    matmul_peak = measure_peak_flops(args.device, dtype, args.peak_n, repeats=15)
    split = step_time_split(step) if args.profile else None
    tokens_per_s = args.batch * args.context / step_s
    flops_per_token = get_preset(args.preset, **overrides).flops_per_token(args.context)
    return {
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token / matmul_peak,
        "step_s": step_s,
        "matmul_peak_flops": matmul_peak,
        "peak_memory_mb": peak_memory_mb,
        "loss": float(loss.detach()),
        "compile_s": compile_s,
        "time_split": split,
    }


def first_layers(folder: Path, layers: int) -> Path:
    """SmolLM2's first `layers` decoder layers (its embedding, norm and head kept) as an HF
    folder beside the full one: a quick run's model, the same for both contenders."""
    from safetensors.torch import load_file, save_file

    from smoltrain.atomic import publish_folder, staging_path

    out = folder.with_name(f"{folder.name}-{layers}-layers")
    if not (out / "model.safetensors").is_file():
        tmp = staging_path(out)
        tmp.mkdir(parents=True, exist_ok=True)
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = layers
        (tmp / "config.json").write_text(json.dumps(config))
        keep = tuple(f"model.layers.{i}." for i in range(layers))
        state = load_file(folder / "model.safetensors")
        kept = {k: v for k, v in state.items() if not k.startswith("model.layers.") or k.startswith(keep)}
        save_file(kept, tmp / "model.safetensors", metadata={"format": "pt"})
        publish_folder(tmp, out)  # a concurrent run's copy, if first, is kept
    return out


def generate(args) -> dict:
    from smoltrain.formats.model_io import _gguf_as_hf_folder, bundled_gguf_path
    from smoltrain.tokenizer import load_tokenizer

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    folder = _gguf_as_hf_folder(bundled_gguf_path())  # the same weights for both contenders
    if args.layers:
        folder = first_layers(folder, args.layers)
    tokenizer = load_tokenizer("smollm2")
    ids = tokenizer([PROMPT] * args.batch, return_tensors="pt")["input_ids"].to(args.device)
    if args.impl == "ours":
        keep_freed_memory()
        from smoltrain.formats.model_io import load_model
        from smoltrain.generate import generate as generate_tokens
        from smoltrain.generate import prepare_for_generation

        model = load_model(folder, dtype=dtype, device=args.device)
        params = model.num_parameters()  # before repacking; a tied weight counted once
        model = prepare_for_generation(model, compile=args.compile)
        linears = type(model.layers[0].mlp.down_proj).__name__  # the linears it chose

        def run(n):
            return generate_tokens(model, ids, max_new_tokens=n, eos_token_id=[])
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
        model.generation_config.eos_token_id = None  # exactly n tokens, as ours with eos_token_id=[]
        params = model.num_parameters()
        linears = "Linear"

        def run(n):
            return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=2)

    with torch.inference_mode():
        start = time.perf_counter()
        run(8)  # warm-up (and compilation, when on)
        warmup_s = time.perf_counter() - start
        # The bandwidth of a shared machine moves from minute to minute (27-57 GB/s here):
        # measured right before each timed run, in the same process, it is the run's own limit.
        probe = torch.ones(args.bandwidth_mb * 2**20 // 4, device=args.device)
        times, bandwidths = [], []
        for _ in range(args.repeats):
            bandwidths.append(read_bandwidth(probe))
            sync(args.device)
            start = time.perf_counter()
            out = run(args.new_tokens)
            sync(args.device)
            times.append(time.perf_counter() - start)
        del probe
    assert out.shape[1] == ids.shape[1] + args.new_tokens
    gen_s = statistics.median(times)
    return {
        "tokens_per_s": args.batch * args.new_tokens / gen_s,
        "seconds": gen_s,
        "params": params,
        "weight_bytes": params * dtype.itemsize,
        "warmup_s": warmup_s,  # with --compile: mostly compilation
        "bandwidth": statistics.median(bandwidths),
        "peak_memory_mb": _peak_memory_mb(args.device),
        "tokens": out[0, ids.shape[1] :].tolist(),
        "linears": linears,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["train", "generate"])
    parser.add_argument("--impl", choices=["ours", "hf"], required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--overrides", default="{}", help="ModelConfig fields as JSON")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=0, help="generate: SmolLM2's first N layers (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="train, CPU: where the step's time goes")
    parser.add_argument("--kernels", default="auto", help="ours: train.kernels (auto, off, or names)")
    parser.add_argument("--tune-malloc", choices=["on", "off"], default="on", help="ours: train.tune_malloc")
    parser.add_argument("--peak-n", type=int, default=2048, help="size of the matmul that measures the peak")
    parser.add_argument("--bandwidth-mb", type=int, default=512, help="size of the bandwidth probe")
    args = parser.parse_args()
    if args.profile and (args.kind != "train" or args.device != "cpu"):
        parser.error("--profile splits a training step's time on CPU only (train --device cpu)")
    if args.impl == "ours" and args.tune_malloc == "on":
        relaunch_with_lean_malloc()  # as the `smoltrain train` command does
    result = train(args) if args.kind == "train" else generate(args)
    if result.get("time_split"):
        print(describe_split(result), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
