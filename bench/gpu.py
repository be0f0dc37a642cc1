"""Every GPU check and measurement of issue 17, in one run of under 8 minutes on one GPU:

    bash bench/gpu.sh                  # on a CUDA machine: writes bench/gpu_results.json and
                                       # bench/GPU_RESULTS.md
    python -m bench.gpu --dry-run      # the same checks on CPU at toy sizes, to prove the
                                       # script; its figures mean nothing and nothing is written

The checks: the environment; 20 CLI steps of configs/smollm2-135m-cosmopedia-gpu.yaml on the
built-in corpus under torch.cuda.set_sync_debug_mode("warn"); which SDPA kernel training
takes; the chunked loss against F.cross_entropy in fp32, bf16 and fp16; an fp16 run whose
loss scale overflows; document masking (FlexAttention) against none, and its gradients
against the dense mask's; ours against transformers, eager and compiled, at context 2048;
the reference run's projected time; generation tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from smoltrain.config import get_preset
from smoltrain.device import peak_flops, sync

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIG = REPO / "configs/smollm2-135m-cosmopedia-gpu.yaml"


def log(line: str) -> None:
    print(line, flush=True)


def environment(device: str) -> dict:
    env = {"device": "cpu (dry run)", "torch": torch.__version__}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {
            "device": torch.cuda.get_device_name(),
            "cuda": torch.version.cuda,
            "memory_gb": round(props.total_memory / 2**30, 1),
            "bf16": torch.cuda.is_bf16_supported(),
            "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
        }
    log(f"environment: {env}")
    return env


def cli(args: list[str], device: str, sync_debug: bool = False, timeout: int = 400) -> tuple[int, str, float]:
    """`smoltrain train ARGS` in a fresh process; (returncode, stderr, seconds)."""
    setup = "import torch; torch.cuda.set_sync_debug_mode('warn'); " if sync_debug else ""
    code = f"{setup}import sys; from smoltrain.cli import main; main(['train', *sys.argv[1:]])"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, *args, "--device", device, "--overwrite"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    return result.returncode, result.stdout + result.stderr, time.perf_counter() - start


def small_model_overrides(dry: bool) -> list[str]:
    """The GPU config's run as it is, or a toy one for the dry run."""
    if not dry:
        return []
    return [
        "model.preset=tiny",
        "data.context_length=64",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=2",
        "train.compile=false",
        "train.precision=bf16",
        "data.num_workers=0",
    ]


def cli_steps(device: str, dry: bool, out: Path) -> dict:
    """20 steps of the GPU config; the host syncs torch reports, per step."""
    steps = 20
    args = [
        "--config",
        str(GPU_CONFIG),
        "--output-dir",
        str(out / "gpu-config"),
        "--max-steps",
        str(steps),
        "data.source=builtin:python-docs",
        "log.trackers=[]",
        "log.progress_bar=false",
        "log.log_every=10",
        f"log.eval_every={steps}",
        f"log.sample_every={steps}",
        f"log.checkpoint_every={steps}",
        "schedule.warmup_steps=5",
        *small_model_overrides(dry),
    ]
    code, text, seconds = cli(args, device, sync_debug=device == "cuda")
    syncs = text.count("called a synchronizing CUDA operation")
    rows = [json.loads(line) for line in (out / "gpu-config/metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "tokens_per_s" in r][-1] if code == 0 else {}
    result = {
        "returncode": code,
        "seconds": round(seconds, 1),
        "sync_warnings": syncs,
        "tokens_per_s": last.get("tokens_per_s"),
        "mfu": last.get("mfu"),
        "loss": last.get("loss"),
    }
    log(f"20 CLI steps of the GPU config: {result}")
    if code != 0:
        log(text[-3000:])
    return result


def sdpa_kernels(device: str, dry: bool) -> list[str]:
    """The aten SDPA kernels a training forward and backward of the 135M model dispatch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from smoltrain.kernels import prepare_for_training
    from smoltrain.model import CustomLLM

    names = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func):
                names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    preset, T = ("tiny", 64) if dry else ("smollm2-135m", 2048)
    model = prepare_for_training(CustomLLM(get_preset(preset)).to(device), device, "bf16")
    ids = torch.randint(0, 49152, (2, T), device=device)
    with Record(), torch.autocast(device, dtype=torch.bfloat16):
        model(ids, labels=ids, return_logits=False).loss.backward()
    # (on CPU in bf16 the CPU attention kernel runs instead of SDPA: the dry run lists none)
    log(f"SDPA kernels in a training step: {sorted(names)}")
    return sorted(names)


def chunked_loss_errors(device: str, dry: bool) -> dict:
    """Relative error of the chunked loss and its gradients against F.cross_entropy on the
    whole logits, in each precision (autocast), with the GradScaler's initial scale."""
    from smoltrain.kernels.chunked_loss import chunked_linear_cross_entropy

    n, hidden_size = (512, 64) if dry else (8192, 576)
    torch.manual_seed(0)
    hidden = torch.randn(n, hidden_size, device=device)
    weight = torch.randn(49152, hidden_size, device=device) * 0.02
    labels = torch.randint(0, 49152, (n,), device=device)
    reference = None
    errors = {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if precision == "fp16" and device == "cpu" and not dry:
            continue
        results = {}
        for kind in ("plain", "chunked"):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                if kind == "plain":
                    loss = F.cross_entropy((h @ w.T).float(), labels)
                else:
                    loss = chunked_linear_cross_entropy(h, w, labels)
            grads = torch.autograd.grad(loss * 65536.0, (h, w))
            results[kind] = (loss.detach().float(), *(g.float() / 65536.0 for g in grads))
        if reference is None:
            reference = results["plain"]
        errors[precision] = {
            name: float((got - want).norm() / want.norm().clamp(min=1e-30))
            for name, got, want in zip(
                ("loss", "grad_hidden", "grad_weight"), results["chunked"], reference, strict=True
            )
        }
        errors[precision]["plain_vs_fp32"] = float(
            (results["plain"][1] - reference[1]).norm() / reference[1].norm()
        )
    log(f"chunked loss vs F.cross_entropy (fp32 reference), relative errors: {errors}")
    return errors


def fp16_overflow(device: str, dry: bool, out: Path) -> dict:
    """An fp16 run from a loss scale that overflows: it must skip, shrink the scale, finish."""
    args = [
        "--config",
        str(GPU_CONFIG),
        "--output-dir",
        str(out / "fp16"),
        "--max-steps",
        "20",
        "data.source=builtin:python-docs",
        "log.trackers=[]",
        "log.progress_bar=false",
        "log.log_every=5",
        "log.eval_every=20",
        "log.sample_every=1000",
        "log.checkpoint_every=1000",
        "data.context_length=512",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=1",
        "train.compile=false",
        *small_model_overrides(dry),
        "train.precision=fp16",
        "train.loss_scale=1e9",
    ]
    code, text, seconds = cli(args, device)
    result = {
        "returncode": code,
        "overflows": text.count("fp16 gradients overflowed"),
        "finished": "done: step 20" in text,
        "seconds": round(seconds, 1),
    }
    log(f"fp16 from loss scale 1e9: {result}")
    if code != 0:
        log(text[-3000:])
    return result


def _time_steps(step, device: str, repeats: int) -> float:
    step()
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return (time.perf_counter() - start) / repeats


def document_mask(device: str, dry: bool) -> dict:
    """Forward + backward with document masking against none (135M, bf16), and the block
    mask's gradients against the dense mask's (FlexAttention's backward runs on CUDA only)."""
    from smoltrain.kernels import prepare_for_training
    from smoltrain.model import CustomLLM

    preset, B, T = ("tiny", 2, 64) if dry else ("smollm2-135m", 8, 2048)
    torch.manual_seed(0)
    model = prepare_for_training(CustomLLM(get_preset(preset)).to(device), device, "bf16")
    ids = torch.randint(0, 49152, (B, T), device=device)
    lengths = torch.randint(50, 600, (B * T // 50,), generator=torch.Generator().manual_seed(0))
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[: B * T].view(B, T).to(device)
    doc = doc - doc[:, :1]

    def step(document_ids):
        def run():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(ids, labels=ids, document_ids=document_ids, return_logits=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    if device == "cpu":  # FlexAttention has no backward on CPU: the dense mask is timed
        log("document mask: dry run times the dense mask (no FlexAttention backward on CPU)")
    plain_s = _time_steps(step(None), device, 3)
    masked_s = _time_steps(step(doc), device, 3)
    result = {"no_mask_step_s": plain_s, "document_mask_step_s": masked_s, "ratio": masked_s / plain_s}
    if device == "cuda":  # gradients through the block mask against the dense mask's
        small = prepare_for_training(CustomLLM(get_preset("tiny")).to(device), device, "fp32")
        dense = CustomLLM(get_preset("tiny")).to(device)
        dense.load_state_dict(small.state_dict())
        sid, sdoc = ids[:2, :512] % dense.config.vocab_size, doc[:2, :512]
        grads = []
        for m in (small, dense):
            m(sid, labels=sid, document_ids=sdoc, return_logits=False).loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        result["flex_vs_dense_grad_rel_error"] = float((grads[0] - grads[1]).norm() / grads[1].norm())
    log(f"document mask: {result}")
    return result


def worker(kind: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "bench.worker", kind, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def versus_transformers(device: str, dry: bool) -> dict:
    """Training tokens/s, MFU and memory at context 2048 in bf16, eager and compiled."""
    preset, batch, context, steps = ("tiny", 2, 64, "2") if dry else ("smollm2-135m", 16, 2048, "10")
    peak, source = peak_flops(device, "bf16")
    flops = get_preset(preset).flops_per_token(context)
    rows = {}
    for impl in ("ours", "hf"):
        for compiled in (False,) if dry else (False, True):
            r = worker(
                "train",
                *("--impl", impl, "--preset", preset, "--precision", "bf16", "--device", device),
                *("--batch", str(batch), "--context", str(context), "--steps", steps, "--warmup", "2"),
                *(["--compile"] if compiled else []),
            )
            r["mfu"] = r["tokens_per_s"] * flops / peak
            rows[f"{impl}_{'compiled' if compiled else 'eager'}"] = r
            log(
                f"train {impl:4} {'compiled' if compiled else 'eager':8} {r['tokens_per_s']:>10,.0f} tok/s "
                f"MFU {r['mfu']:.1%} (vs {source}) peak {r['peak_memory_mb']:,.0f} MB loss {r['loss']:.4f}"
            )
    off = worker(
        "train",
        *(
            "--impl",
            "ours",
            "--preset",
            preset,
            "--precision",
            "bf16",
            "--device",
            device,
            "--kernels",
            "off",
        ),
        *("--batch", str(batch), "--context", str(context), "--steps", steps, "--warmup", "2"),
    )
    rows["ours_kernels_off"] = off
    log(f"train ours kernels=off {off['tokens_per_s']:>10,.0f} tok/s peak {off['peak_memory_mb']:,.0f} MB")
    return {"peak_flops": peak, "peak_source": source, "rows": rows}


def reference_projection(device: str, dry: bool) -> dict:
    """The reference run is 5000 steps of 32 x 256 tokens: its time at the measured rate,
    with the step's 32 sequences as micro-batches of 4 (the config) and as one of 32."""
    preset, steps = ("tiny", "2") if dry else ("smollm2-135m", "20")
    result = {}
    for batch in (4, 32):
        r = worker(
            "train",
            *("--impl", "ours", "--preset", preset, "--precision", "bf16", "--device", device),
            *("--batch", str(batch), "--context", "256", "--steps", steps, "--warmup", "3"),
        )
        result[f"micro_batch_{batch}_s"] = 5000 * 8192 / r["tokens_per_s"]
    log(f"reference run (5000 x 8,192 tokens) projected: {result}")
    return result


def generation(device: str, dry: bool) -> dict:
    result = {}
    for impl, compiled in (("ours", False), ("ours", True), ("hf", False)):
        if dry and compiled:
            continue
        r = worker(
            "generate",
            *("--impl", impl, "--batch", "1", "--precision", "bf16", "--device", device),
            *("--new-tokens", "32" if dry else "256", "--repeats", "1" if dry else "3"),
            *(["--compile"] if compiled else []),
        )
        result[f"{impl}_{'compiled' if compiled else 'eager'}_tokens_per_s"] = r["tokens_per_s"]
    log(f"generation, batch 1, bf16: {result}")
    return result


def write_report(results: dict, folder: Path) -> None:
    (folder / "gpu_results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = results["versus_transformers"]["rows"]
    lines = [
        f"# GPU results: {results['device']}, torch {results['torch']}",
        "",
        f"Written by `bash bench/gpu.sh` on {time.strftime('%Y-%m-%d')}. MFU against "
        f"{results['versus_transformers']['peak_flops'] / 1e12:,.0f} TFLOP/s "
        f"({results['versus_transformers']['peak_source']}).",
        "",
        "| training, smollm2-135m, bf16, context 2048 | tokens/s | MFU | peak memory (MB) | loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_memory_mb']:,.0f} | {r['loss']:.4f} |"
        )
    lines += [
        "",
        f"- ours vs transformers (best of eager/compiled each): {results['ours_vs_transformers']:.2f}x",
        f"- reference run (5000 steps x 8,192 tokens), projected: "
        f"{results['reference_5000_steps_s'] / 60:.1f} min",
        f"- 20 CLI steps of the GPU config: {results['cli_steps']}",
        f"- SDPA kernels in training: {', '.join(results['sdpa_kernels'])}",
        f"- chunked loss relative errors: {results['chunked_loss']}",
        f"- fp16 from an overflowing scale: {results['fp16_overflow']}",
        f"- document mask: {results['document_mask']}",
        f"- generation: {results['generation']}",
        "",
    ]
    (folder / "GPU_RESULTS.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on CPU at toy sizes; writes nothing")
    args = parser.parse_args()
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU; `python -m bench.gpu --dry-run` runs it on CPU")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        results = environment(device)
        results["cli_steps"] = cli_steps(device, dry, out)
        results["sdpa_kernels"] = sdpa_kernels(device, dry)
        results["chunked_loss"] = chunked_loss_errors(device, dry)
        results["fp16_overflow"] = fp16_overflow(device, dry, out)
        results["document_mask"] = document_mask(device, dry)
        results["versus_transformers"] = versus_transformers(device, dry)
        rows = results["versus_transformers"]["rows"]
        results["mfu_bf16_2048_eager"] = rows["ours_eager"]["mfu"]
        results["mfu_bf16_2048_compiled"] = rows.get("ours_compiled", {}).get("mfu")
        best = {
            impl: max(
                r["tokens_per_s"] for k, r in rows.items() if k in (f"{impl}_eager", f"{impl}_compiled")
            )
            for impl in ("ours", "hf")
        }
        results["ours_vs_transformers"] = best["ours"] / best["hf"]
        projection = reference_projection(device, dry)
        results["reference_projection"] = projection
        results["reference_5000_steps_s"] = min(projection.values())
        results["generation"] = generation(device, dry)
    results["script_seconds"] = round(time.perf_counter() - start, 1)
    log(
        f"MFU bf16 2048: eager {results['mfu_bf16_2048_eager']:.1%}, compiled "
        f"{results['mfu_bf16_2048_compiled'] or float('nan'):.1%}; ours vs transformers "
        f"{results['ours_vs_transformers']:.2f}x; "
        f"reference run {results['reference_5000_steps_s'] / 60:.1f} min; "
        f"script {results['script_seconds']:.0f}s"
    )
    if not dry:
        write_report(results, REPO / "bench")


if __name__ == "__main__":
    main()
