#!/usr/bin/env bash
# One CUDA GPU: training tokens/s and MFU of the smollm2-135m preset at context 2048 in bf16,
# eager and torch.compile, against transformers, and train.kernels auto against off; then
# the time for the reference's 5000 steps of 8,192 tokens at the measured rate. Run from the repository root after `make setup`
# (on a CUDA machine, install a CUDA build of torch first: TORCH_SPEC=torch make setup).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY - <<'PY'
import json, subprocess, sys, torch
assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA GPU"
from smoltrain.config import get_preset

name = torch.cuda.get_device_name()
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ a
torch.cuda.synchronize()
start = torch.cuda.Event(enable_timing=True); end = torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(10):
    a @ a
end.record(); torch.cuda.synchronize()
peak = 2 * n**3 * 10 / (start.elapsed_time(end) / 1000)
print(f"{name}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
flops = get_preset("smollm2-135m").flops_per_token(2048)

def run(impl, compile_, batch=16, kernels="auto"):
    args = [sys.executable, "-m", "bench.worker", "train", "--impl", impl, "--preset", "smollm2-135m",
            "--precision", "bf16", "--device", "cuda", "--batch", str(batch), "--context", "2048",
            "--steps", "10", "--warmup", "3", "--kernels", kernels] + (["--compile"] if compile_ else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])

rows = {}
for impl in ("ours", "hf"):
    for compile_ in (False, True):
        r = run(impl, compile_)
        rows[(impl, compile_)] = r
        mfu = r["tokens_per_s"] * flops / peak
        extra = f", compile {r['compile_s']:.0f}s" if r.get("compile_s") else ""
        print(f"{impl:5} compile={compile_!s:5} {r['tokens_per_s']:>10,.0f} tok/s  MFU {mfu:.0%}  "
              f"peak {r['peak_memory_mb']:,.0f} MB{extra}")
# train.kernels=auto against off on this GPU: whether CUDA's `auto` list pays (smoltrain/kernels)
off = run("ours", False, kernels="off")
print(f"ours  kernels=off  {off['tokens_per_s']:>10,.0f} tok/s  peak {off['peak_memory_mb']:,.0f} MB "
      f"(auto/off {rows[('ours', False)]['tokens_per_s'] / off['tokens_per_s']:.2f}x)")
best = max(r["tokens_per_s"] for (impl, _), r in rows.items() if impl == "ours")
print(f"reference run (5000 steps x 8,192 tokens) at {best:,.0f} tok/s: {5000 * 8192 / best / 60:.1f} min")
PY
