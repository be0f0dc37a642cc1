"""Every GPU check and measurement of issues 17, 28 and 29 on one GPU, each section under its
own time limit, its failure recorded instead of ending the run:

    bash bench/gpu.sh                  # on a CUDA machine: bench/gpu_results.json (rewritten
                                       # after every section) and bench/GPU_RESULTS.md
    bash bench/gpu.sh --missing        # in a later lease: the sections not yet measured
    python -m bench.gpu --dry-run      # the same sections on CPU at toy sizes, to prove the
        [--out results.json]           # script; its figures mean nothing

All of them need about 24 minutes with a cold inductor cache, more than one 15-minute lease:
a run does what fits in `--budget` seconds (9 minutes) and `--missing` adds the rest later.
The sections (`SECTIONS`): 20 CLI steps of
configs/smollm2-135m-cosmopedia-gpu.yaml; host syncs counted in steps 3-6; a sample right
after a bf16 step; an RNG file of more GPUs than are here; which SDPA kernel training takes;
the chunked loss against F.cross_entropy in fp32, bf16 and fp16; an fp16 run whose loss scale
overflows; document masks (FlexAttention) against none, eager and compiled (graph breaks,
recompiles); ours against transformers at context 2048 (MFU with full and causal attention
FLOPs); the GPU config's step memory against `smoltrain env`'s estimate; Muon's step time;
`smoltrain env` on the GPU (what `auto` picks, its memory estimate for the 360M preset
against a real step); the reference run's projected time; generation; CUDA-graph re-records
of the compiled decode over 3 generations; lm-eval items/s.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from smoltrain.device import peak_flops, sync
from smoltrain.generate import generate
from smoltrain.model.config import get_preset

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIG = REPO / "configs/smollm2-135m-cosmopedia-gpu.yaml"
# The 16-bit precision the sections train in: bf16, except in a dry run on a CPU that
# emulates bf16 (minutes for a toy step there), where they run in fp32 on the same paths.
HALF = "bf16"
DRY_TOKENIZER = "smollm2"  # a dry run's: a 512-token one learned at its start


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
        f"tokenizer={DRY_TOKENIZER}",  # a small vocabulary: a 49k head is most of a toy step
        "data.context_length=64",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=2",
        "train.compile=false",
        f"train.precision={HALF}",
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

    from smoltrain.model import CustomLLM
    from smoltrain.model.kernels import prepare_for_training

    names = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func):
                names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    preset, T = ("tiny", 64) if dry else ("smollm2-135m", 2048)
    model = prepare_for_training(CustomLLM(get_preset(preset)).to(device), device, HALF)
    ids = torch.randint(0, 49152, (2, T), device=device)
    with Record(), torch.autocast(device, dtype=torch.bfloat16, enabled=HALF == "bf16"):
        model(ids, labels=ids, return_logits=False).loss.backward()
    # (on CPU in bf16 the CPU attention kernel runs instead of SDPA: the dry run lists none)
    log(f"SDPA kernels in a training step: {sorted(names)}")
    return sorted(names)


def chunked_loss_errors(device: str, dry: bool) -> dict:
    """Relative error of the chunked loss and its gradients against F.cross_entropy on the
    whole logits, in each precision (autocast), with the GradScaler's initial scale."""
    from smoltrain.model.kernels.chunked_loss import chunked_linear_cross_entropy

    # dry: a smaller vocabulary (a CPU without bf16 units emulates it: 26 s at 49,152)
    n, hidden_size, vocab = (512, 64, 4096) if dry else (8192, 576, 49152)
    torch.manual_seed(0)
    hidden = torch.randn(n, hidden_size, device=device)
    weight = torch.randn(vocab, hidden_size, device=device) * 0.02
    labels = torch.randint(0, vocab, (n,), device=device)
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
    steps = 8 if dry else 20  # fp16 is emulated on most CPUs
    args = [
        "--config",
        str(GPU_CONFIG),
        "--output-dir",
        str(out / "fp16"),
        "--max-steps",
        str(steps),
        "data.source=builtin:python-docs",
        "log.trackers=[]",
        "log.progress_bar=false",
        "log.log_every=5",
        f"log.eval_every={steps}",
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
        "finished": f"done: step {steps}" in text,
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
    from smoltrain.model import CustomLLM
    from smoltrain.model.kernels import prepare_for_training

    preset, B, T = ("tiny", 2, 64) if dry else ("smollm2-135m", 8, 2048)
    torch.manual_seed(0)
    model = prepare_for_training(CustomLLM(get_preset(preset)).to(device), device, HALF)
    ids = torch.randint(0, 49152, (B, T), device=device)
    lengths = torch.randint(50, 600, (B * T // 50,), generator=torch.Generator().manual_seed(0))
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[: B * T].view(B, T).to(device)
    doc = doc - doc[:, :1]

    def step(document_ids):
        def run():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=HALF == "bf16"):
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
    from bench.worker import launch_env

    cmd = [sys.executable, "-m", "bench.worker", kind, *args]
    env = launch_env(args)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


@functools.cache
def training_peak(device: str) -> tuple[float, str]:
    """The MFU ceiling of every training row, found once a run (on a GPU with no datasheet
    entry, `peak_flops` times large matmuls)."""
    return peak_flops(device, HALF)


def train_row(impl: str, compiled: bool = False, kernels: str = "auto"):
    """A section: training tokens/s, MFU and memory at context 2048 in bf16, one row of ours
    against transformers (a row per section: a run cut short keeps the rows it measured)."""

    def section(device: str, dry: bool) -> dict:
        if dry and compiled:
            return {"skipped": "dry run: nothing is compiled"}
        preset, batch, context, steps = ("tiny", 2, 64, "2") if dry else ("smollm2-135m", 16, 2048, "10")
        peak, source = training_peak(device)
        config = get_preset(preset)
        flops = config.flops_per_token(context)
        # causal attention computes half the scores: 6 L H T per token instead of 12 L H T
        causal = flops - 6 * config.num_hidden_layers * config.hidden_size * context
        r = worker(
            "train",
            *("--impl", impl, "--preset", preset, "--precision", HALF, "--device", device),
            *("--batch", str(batch), "--context", str(context), "--steps", steps, "--warmup", "2"),
            *(["--compile"] if compiled else []),
            *(["--kernels", kernels] if impl == "ours" else []),
        )
        r |= {"mfu": r["tokens_per_s"] * flops / peak, "mfu_causal": r["tokens_per_s"] * causal / peak}
        r |= {"peak_flops": peak, "peak_source": source}
        log(
            f"train {impl:4} {'compiled' if compiled else 'eager':8} kernels={kernels:4} "
            f"{r['tokens_per_s']:>10,.0f} tok/s MFU {r['mfu']:.1%} (vs {source}) "
            f"peak {r['peak_memory_mb']:,.0f} MB loss {r['loss']:.4f}"
        )
        return r

    return section


def reference_projection(device: str, dry: bool) -> dict:
    """The reference run is 5000 steps of 32 x 256 tokens: its time at the measured rate,
    with the step's 32 sequences as micro-batches of 4 (the config) and as one of 32."""
    preset, steps = ("tiny", "2") if dry else ("smollm2-135m", "20")
    result = {}
    for batch in (4, 32):
        r = worker(
            "train",
            *("--impl", "ours", "--preset", preset, "--precision", HALF, "--device", device),
            *("--batch", str(batch), "--context", "32" if dry else "256", "--steps", steps, "--warmup", "3"),
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
            *("--impl", impl, "--batch", "1", "--precision", HALF, "--device", device),
            *("--new-tokens", "32" if dry else "256", "--repeats", "1" if dry else "3"),
            *("--layers", "2" if dry else "0"),  # dry: SmolLM2's first 2 layers
            *(["--compile"] if compiled else []),
        )
        result[f"{impl}_{'compiled' if compiled else 'eager'}_tokens_per_s"] = r["tokens_per_s"]
    log(f"generation, batch 1, bf16: {result}")
    return result


def sync_count(device: str, dry: bool, out: Path) -> dict:
    """Host syncs in steps 3-6 of the GPU config's run, counted one by one: torch's sync
    debug mode in "warn" with every warning kept (Python shows a call site's warning once,
    so counting printed warnings undercounts; "error" would abort the step at the loop's one
    intended sync, the logged loss). Each sync's call site is kept for the report."""
    import warnings

    from smoltrain.train.config import load_config
    from smoltrain.train.setup import setup_run
    from smoltrain.train.step import train_step

    overrides = [
        "data.source=builtin:python-docs",
        "log.trackers=[]",
        "log.progress_bar=false",
        "log.eval_every=1000",
        "log.sample_every=1000",
        "log.checkpoint_every=1000",
        f"output_dir={out / 'syncs'}",
        f"train.device={device}",
        *small_model_overrides(dry),
    ]
    run = setup_run(load_config(str(GPU_CONFIG), overrides), overwrite=True)
    for _ in range(2):
        train_step(run)
    per_step, sites = [], {}
    for _ in range(4):  # steps 3-6
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                train_step(run)
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
        found = [w for w in caught if "synchronizing" in str(w.message)]
        per_step.append(len(found))
        for w in found:
            site = f"{Path(w.filename).name}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    run.metrics.close()
    if run.lock:
        run.lock.release()
    result = {"syncs_per_step": per_step, "sites": sites}
    log(f"host syncs, steps 3-6: {result}")
    return result


def sample_after_bf16_step(device: str, dry: bool, out: Path) -> dict:
    """A sample right after a bf16 step, with no eval before it in that step."""
    args = [
        "--config",
        str(GPU_CONFIG),
        "--output-dir",
        str(out / "sample"),
        "--max-steps",
        "4",
        "data.source=builtin:python-docs",
        "log.trackers=[]",
        "log.progress_bar=false",
        "log.eval_every=1000",
        "log.sample_every=3",
        "log.checkpoint_every=1000",
        "train.precision=bf16",
        "schedule.warmup_steps=2",
        *small_model_overrides(dry),
    ]
    code, text, seconds = cli(args, device)
    rows = (
        [json.loads(line) for line in (out / "sample/metrics.jsonl").read_text().splitlines()]
        if code == 0
        else []
    )
    result = {
        "returncode": code,
        "sampled_at": [r["step"] for r in rows if "sample" in r],
        "seconds": round(seconds, 1),
    }
    log(f"sample after a bf16 step: {result}")
    if code != 0:
        log(text[-3000:])
    return result


def resume_with_more_rng_states(device: str, dry: bool) -> dict:
    """An RNG file saved the old way, with the states of 8 GPUs, restored where fewer are."""
    from smoltrain.train.checkpoint import rng_state, set_rng_state

    state = rng_state()
    if device == "cuda":
        state["cuda"] = [torch.cuda.get_rng_state()] * 8
    set_rng_state(state)
    result = {"restored": True, "visible_gpus": torch.cuda.device_count() if device == "cuda" else 0}
    log(f"resume from an RNG file of 8 GPUs: {result}")
    return result


def compiled_document_masks(device: str, dry: bool) -> dict:
    """torch.compile over training with document masks: loss against eager, graph breaks and
    recompiles over steps whose documents differ."""
    import torch._dynamo

    from smoltrain.model import CustomLLM
    from smoltrain.model.kernels import prepare_for_training

    preset, B, T = ("tiny", 2, 64) if dry else ("smollm2-135m", 4, 2048)
    toy = {"num_hidden_layers": 1, "vocab_size": 512} if dry else {}  # dry: less to compile
    torch.manual_seed(0)
    model = prepare_for_training(CustomLLM(get_preset(preset, **toy)).to(device), device, HALF)
    ids = torch.randint(0, model.config.vocab_size, (B, T), device=device)

    def documents(seed: int) -> torch.Tensor:
        lengths = torch.randint(20, T, (B * T // 20,), generator=torch.Generator().manual_seed(seed))
        doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[: B * T].view(B, T).to(device)
        return doc - doc[:, :1]

    def loss_of(forward, doc):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=HALF == "bf16"):
            return forward(ids, labels=ids, document_ids=doc, return_logits=False).loss

    explained = torch._dynamo.explain(model)(ids, labels=ids, document_ids=documents(0), return_logits=False)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    torch._dynamo.utils.counters.clear()
    losses = []
    for seed in range(3):
        doc = documents(seed)
        eager = loss_of(model, doc)
        got = loss_of(compiled, doc)
        (got if device == "cuda" else eager).backward()
        model.zero_grad(set_to_none=True)
        losses.append((float(eager.detach()), float(got.detach())))
    result = {
        "graph_breaks": explained.graph_break_count,
        "recompiles": int(torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)),
        "eager_vs_compiled_loss": losses,
        "max_loss_difference": max(abs(a - b) for a, b in losses),
    }
    log(f"compiled training with document masks: {result}")
    return result


def decode_graph_records(device: str, dry: bool) -> dict:
    """The compiled decode step over 3 generations of the same shape: graphs compiled and
    CUDA graphs recorded should not grow after the first."""
    import torch._dynamo

    from smoltrain.generate import prepare_for_generation
    from smoltrain.model import CustomLLM

    torch.manual_seed(0)
    model = prepare_for_generation(
        CustomLLM(get_preset("tiny" if dry else "smollm2-135m")).to(device), compile=True
    )
    counts = []
    prompt = torch.randint(0, 1000, (1, 16), device=device)
    for _ in range(3):
        generate(model, prompt, max_new_tokens=8 if dry else 64)
        stats = torch._dynamo.utils.counters
        counts.append(
            {
                "graphs": int(stats["stats"].get("unique_graphs", 0)),
                "cudagraph_recordings": int(sum(v for k, v in stats["inductor"].items() if "cudagraph" in k)),
            }
        )
    result = {"after_each_generation": counts, "re_records": counts[-1] != counts[0]}
    log(f"compiled decode over 3 generations: {result}")
    return result


def lm_eval_items(device: str, dry: bool) -> dict:
    """lm-eval items/s of our adapter against lm_eval --model hf (bench.evals)."""
    cmd = [sys.executable, "-m", "bench.evals", "--copies", "1" if dry else "4", "--repeats", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = [line for line in out.stdout.splitlines() if "items/s" in line or "ratio" in line]
    same = "same scores: True" in out.stdout  # our adapter's scores equal lm_eval's own
    result = {"returncode": out.returncode, "same_scores": same, "lines": lines[-6:]}
    log(f"lm-eval items/s: {result}")
    return result


def gpu_config_memory(device: str, dry: bool) -> dict:
    """Peak memory of one step of the GPU config at its micro-batch, against `smoltrain env`'s
    estimate for it."""
    from smoltrain.model.kernels import choose_kernels
    from smoltrain.train.config import load_config
    from smoltrain.train.machine import estimate_training_memory

    cfg = load_config(str(GPU_CONFIG), small_model_overrides(dry))
    batch, context = cfg.train.micro_batch_size, cfg.data.context_length
    preset = cfg.model.preset
    r = worker(
        "train",
        *("--impl", "ours", "--preset", preset, "--precision", HALF, "--device", device),
        *(
            "--batch",
            str(batch),
            "--context",
            str(context),
            "--steps",
            "1",
            "--warmup",
            "1",
            "--peak-n",
            "256",
        ),
    )
    estimate = estimate_training_memory(
        get_preset(preset), batch, context, device, HALF, choose_kernels(device, HALF)
    )
    result = {
        "micro_batch": batch,
        "context": context,
        "peak_mb": r["peak_memory_mb"],
        "estimate_mb": estimate.total / 2**20,
    }
    log(f"GPU config's step memory: {result}")
    return result


def env_command(device: str, dry: bool) -> dict:
    """`smoltrain env --json` on this machine (issue 28): what `auto` picks on a GPU, and its
    memory estimate for the 360M preset at 8 x 2048 against a real step's peak there."""
    preset, batch, context = ("tiny", 2, 64) if dry else ("smollm2-360m", 8, 2048)
    cmd = [sys.executable, "-m", "smoltrain", "env", "--json", "--device", device, "--preset", preset]
    cmd += ["--micro-batch", str(batch), "--context", str(context)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, timeout=120)
    report = json.loads(out.stdout)
    r = worker(
        "train",
        *("--impl", "ours", "--preset", preset, "--precision", report["auto"]["precision"]),
        *("--device", device, "--batch", str(batch), "--context", str(context)),
        *("--steps", "1", "--warmup", "1", "--peak-n", "256"),
    )
    result = {
        "auto": report["auto"],
        "devices": report["devices"],
        "estimate_gb": report["memory"]["total_gb"],
        "peak_gb": round(r["peak_memory_mb"] * 2**20 / 1e9, 2),  # env's GB are 1e9 bytes
    }
    log(f"smoltrain env: {result}")
    return result


def muon_step_time(device: str, dry: bool) -> dict:
    """Time of one optimizer step, AdamW alone against Muon + AdamW, on the 135M model."""
    from smoltrain.model import CustomLLM
    from smoltrain.train.config import load_config
    from smoltrain.train.optim import build_optimizers

    model = CustomLLM(get_preset("tiny" if dry else "smollm2-135m")).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    result = {}
    for name in ("adamw", "muon"):
        cfg = load_config(None, [f"optim.name={name}"])
        optimizers = build_optimizers(model, cfg, device)

        def step(optimizers=optimizers):
            for opt in optimizers:
                opt.step()

        result[f"{name}_step_ms"] = 1000 * _time_steps(step, device, 3 if dry else 10)
    log(f"optimizer step: {result}")
    return result


def write_report(results: dict, folder: Path) -> None:
    """bench/GPU_RESULTS.md from the results (the JSON is written after every section)."""
    env = results["environment"]
    runs = [
        f"{r['date']}, {r.get('device')}, torch {r['torch']}, {len(r['sections'])} sections"
        for r in results["runs"]
    ]
    lines = [
        f"# GPU results: {env['device']}, torch {env['torch']}",
        "",
        f"Written by `bash bench/gpu.sh` (`--missing` adds what a run left): {'; '.join(runs)}.",
        "",
        f"Summary: {results.get('summary')}",
        "",
    ]
    rows = training_rows(results)
    if rows:
        first = next(iter(rows.values()))
        lines += [
            f"MFU against {first['peak_flops'] / 1e12:,.0f} TFLOP/s ({first['peak_source']}); "
            "causal: attention FLOPs of the causal half only.",
            "",
            "| training, bf16, context 2048 | tokens/s | MFU | MFU (causal) | peak memory (MB) | loss |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['mfu_causal']:.1%} | "
                f"{r['peak_memory_mb']:,.0f} | {r['loss']:.4f} |"
            )
        lines.append("")
    for name, _, _ in SECTIONS:
        r = results.get(name)
        if r is None:
            lines.append(f"- {name}: not run yet (`bash bench/gpu.sh --missing` runs it)")
        elif name not in rows:
            shown = r["result"] if r["ok"] else f"FAILED: {r['error']}"
            lines.append(f"- {name} ({r['seconds']} s): {shown}")
    (folder / "GPU_RESULTS.md").write_text("\n".join(lines) + "\n")


# (name, the function, its time limit in seconds on one H200 with a cold inductor cache, from
# the first lent run: torch 2.11, 16 CPU cores compiling). All of them take about 24 minutes,
# more than one lease: `--budget` runs what fits, `--missing` the rest in a later lease.
SECTIONS = [
    ("resume_with_more_rng_states", resume_with_more_rng_states, 5),
    ("sdpa_kernels", sdpa_kernels, 10),
    ("chunked_loss", chunked_loss_errors, 10),
    ("document_mask", document_mask, 20),
    ("gpu_config_memory", gpu_config_memory, 25),
    ("env_command", env_command, 35),
    ("muon_step_time", muon_step_time, 15),
    ("fp16_overflow", fp16_overflow, 50),
    ("train_ours_eager", train_row("ours"), 40),
    ("train_hf_eager", train_row("hf"), 40),
    ("train_ours_kernels_off", train_row("ours", kernels="off"), 40),
    ("train_ours_compiled", train_row("ours", compiled=True), 120),
    ("train_hf_compiled", train_row("hf", compiled=True), 150),
    ("generation", generation, 120),
    ("cli_steps", cli_steps, 180),
    ("sync_count", sync_count, 120),
    ("sample_after_bf16_step", sample_after_bf16_step, 120),
    ("compiled_document_masks", compiled_document_masks, 150),
    ("reference_projection", reference_projection, 40),
    ("decode_graph_records", decode_graph_records, 90),
    ("lm_eval_items", lm_eval_items, 60),
]


class SectionTimeout(Exception):
    pass


def run_section(name: str, fn, limit_s: int, device: str, dry: bool, out: Path) -> dict:
    """One section, its failure or overrun recorded instead of ending the script (a lent GPU
    runs it once: every section that can report must)."""
    import signal
    import traceback

    def overrun(signum, frame):
        raise SectionTimeout(f"over its {limit_s} s limit")

    start = time.perf_counter()
    signal.signal(signal.SIGALRM, overrun)
    signal.alarm(limit_s * (10 if dry else 1))  # the limits are H200 figures; CPU is slower
    try:
        args = (
            (device, dry, out)
            if "out" in fn.__code__.co_varnames[: fn.__code__.co_argcount]
            else (device, dry)
        )
        return {"ok": True, "result": fn(*args), "seconds": round(time.perf_counter() - start, 1)}
    except Exception as e:  # noqa: BLE001 - every failure is a finding to keep
        log(f"section {name} failed: {e!r}")
        return {
            "ok": False,
            "error": repr(e),
            "trace": traceback.format_exc()[-2000:],
            "seconds": round(time.perf_counter() - start, 1),
        }
    finally:
        signal.alarm(0)


def training_rows(results: dict) -> dict:
    """The training rows measured so far, by section name."""
    return {
        name: r["result"]
        for name, r in results.items()
        if name.startswith("train_") and isinstance(r, dict) and r.get("ok") and "tokens_per_s" in r["result"]
    }


def summarize(results: dict) -> dict:
    """The headline figures, from whichever sections reported."""
    summary = {}
    rows = training_rows(results)
    for name in ("train_ours_eager", "train_ours_compiled"):
        if name in rows:
            summary[f"mfu_bf16_2048_{name.removeprefix('train_ours_')}"] = rows[name]["mfu"]
    best = {
        impl: max((r["tokens_per_s"] for k, r in rows.items() if k.startswith(f"train_{impl}_")), default=0)
        for impl in ("ours", "hf")
    }
    if best["ours"] and best["hf"]:
        summary["ours_vs_transformers"] = best["ours"] / best["hf"]
        summary["ours_vs_transformers_rows"] = "best measured of each"
    projection = results.get("reference_projection", {}).get("result")
    if projection:
        summary["reference_5000_steps_s"] = min(projection.values())
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on CPU at toy sizes")
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default bench/gpu_results.json)"
    )
    parser.add_argument("--only", default=None, help="comma-separated section names")
    parser.add_argument(
        "--missing",
        action="store_true",
        help="run only the sections the results file lacks or that failed there, and add them to it",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds (default 540 on a GPU, none in a dry run): a section whose limit would pass "
        "this is left for a later run (--missing)",
    )
    args = parser.parse_args()
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU; `python -m bench.gpu --dry-run` runs it on CPU")
    path = args.out or (None if dry else REPO / "bench/gpu_results.json")
    global HALF, DRY_TOKENIZER
    if dry:
        from smoltrain.data.sources import training_documents
        from smoltrain.device import choose_precision
        from smoltrain.tokenizer import train_tokenizer

        HALF = choose_precision("auto", "cpu").precision
        DRY_TOKENIZER = tempfile.mkdtemp(prefix="gpu-dry-tokenizer-")
        atexit.register(shutil.rmtree, DRY_TOKENIZER, True)  # the sections share it to the end
        documents = training_documents("builtin:python-docs", 200)
        train_tokenizer(documents, 512).save_pretrained(DRY_TOKENIZER)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not dry:  # one inductor cache for every process of this script, and for a rerun
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / "runs/inductor-cache"))
    start = time.perf_counter()
    wanted = set(args.only.split(",")) if args.only else None
    earlier = json.loads(path.read_text()) if args.missing and path and path.is_file() else {}
    results: dict = earlier | {"environment": environment(device), "dry_run": dry}
    this_run = {"date": time.strftime("%Y-%m-%d"), "device": results["environment"]["device"]}
    this_run |= {"torch": torch.__version__, "sections": []}
    results["runs"] = [*earlier.get("runs", []), this_run]
    budget = args.budget or (float("inf") if dry else 540)
    left = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn, limit_s in SECTIONS:
            if (wanted and name not in wanted) or earlier.get(name, {}).get("ok"):
                continue
            if time.perf_counter() - start + limit_s > budget:
                left.append(name)
                continue
            results[name] = run_section(name, fn, limit_s, device, dry, Path(tmp))
            this_run["sections"].append(name)
            results["summary"] = summarize(results)
            this_run["seconds"] = round(time.perf_counter() - start, 1)
            if path:  # after every section: a run cut short keeps what it measured
                path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    failed = [name for name, r in results.items() if isinstance(r, dict) and r.get("ok") is False]
    log(
        f"summary: {results.get('summary')}; failed sections: {failed or 'none'}; "
        f"left for a later run (--missing), over the {budget:.0f} s budget: {left or 'none'}; "
        f"script {time.perf_counter() - start:.0f}s"
    )
    if not dry:
        write_report(results, REPO / "bench")


if __name__ == "__main__":
    main()
