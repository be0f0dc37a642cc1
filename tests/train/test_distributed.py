"""Several processes on CPU with the gloo backend, launched as users do (torchrun)."""

import json
import math
import subprocess
import sys
import time

import pytest

from tests.train.test_train import losses, metric_rows, small_run_args, small_vocabulary

pytestmark = pytest.mark.slow  # every test here launches processes with torchrun


def launch(
    nproc: int, *args: str, script: str | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    target = [script] if script else ["-m", "smoltrain", "train"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *target,
    ]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


def run_args(tmp_path, out, *extra):
    # the global batch is fixed (8 sequences); accumulation follows the process count
    return small_run_args(
        tmp_path,
        out,
        "--max-steps",
        "10",
        "log.log_every=1",
        "train.global_batch_size=8",
        small_vocabulary(),
        *extra,
    )


def assert_close(a: dict[int, float], b: dict[int, float], steps, tolerance: float = 1e-5) -> None:
    for step in steps:
        assert abs(a[step] - b[step]) < tolerance, (step, a[step], b[step])


def test_two_processes_follow_the_one_process_trajectory(tmp_path):
    one = launch(1, *run_args(tmp_path, "one"))
    two = launch(2, *run_args(tmp_path, "two"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 x 4 accumulation x 1 process(es)" in one.stdout
    assert "2 x 2 accumulation x 2 process(es)" in two.stdout
    assert two.stdout.count(": eval loss") == one.stdout.count(": eval loss") == 1  # once, not per rank
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(a) == list(range(1, 11))
    assert_close(a, b, range(1, 11))


def test_checkpoints_resume_on_another_process_count(tmp_path):
    from transformers import AutoModelForCausalLM

    assert launch(1, *run_args(tmp_path, "straight")).returncode == 0
    straight = losses(tmp_path / "straight")
    for first, second, name in ((2, 1, "two-then-one"), (1, 2, "one-then-two")):
        started = launch(first, *run_args(tmp_path, name, "--stop-at-step", "5"))
        assert started.returncode == 0, started.stderr[-3000:]
        resumed = launch(second, "--phase", "resume", "--checkpoint", str(tmp_path / name))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_close(straight, losses(tmp_path / name), range(1, 11))
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name / "final")
        assert sum(p.numel() for p in model.parameters()) > 0


FAILING_RANK = """
import os, sys
import torch
calls = []
real_step = torch.optim.AdamW.step
def step(self, *args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        raise RuntimeError("injected failure on rank 1")
    return real_step(self, *args, **kwargs)
torch.optim.AdamW.step = step
from smoltrain.cli import main
main(["train", *sys.argv[1:]])
"""


def test_a_failing_rank_ends_the_launch(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANK)
    start = time.time()
    result = launch(2, *run_args(tmp_path, "fail"), script=str(script), timeout=240)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr
    assert time.time() - start < 120  # no hang waiting on the dead rank


def test_global_batch_must_divide(tmp_path):
    result = launch(2, *run_args(tmp_path, "bad", "train.global_batch_size=6", "train.micro_batch_size=4"))
    assert result.returncode != 0
    assert "global_batch_size 6 is not divisible by micro_batch_size 4 x 2 processes" in result.stderr


def test_fsdp_follows_the_one_process_trajectory_and_resumes_on_one(tmp_path):
    from transformers import AutoModelForCausalLM

    assert launch(1, *run_args(tmp_path, "one")).returncode == 0
    one = losses(tmp_path / "one")
    # sharded over 2 processes, with activation checkpointing, to the end (final/ is gathered)
    full = launch(2, *run_args(tmp_path, "fsdp", "train.fsdp=true", "train.gradient_checkpointing=true"))
    assert full.returncode == 0, full.stderr[-3000:]
    assert_close(one, losses(tmp_path / "fsdp"), range(1, 11))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp/final")
    assert sum(p.numel() for p in hf.parameters()) > 0
    # stopped at 5 on 2 sharded processes, resumed on 1
    half = launch(2, *run_args(tmp_path, "fsdp-resume", "train.fsdp=true", "--stop-at-step", "5"))
    assert half.returncode == 0, half.stderr[-3000:]
    resumed = launch(1, "--phase", "resume", "--checkpoint", str(tmp_path / "fsdp-resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(one, losses(tmp_path / "fsdp-resume"), range(1, 11))
    assert (tmp_path / "fsdp-resume/final/model.safetensors").is_file()


LOCAL_FOLDERS = """
import os, sys
from smoltrain.cli import main
# each rank its own output folder and checkpoint path: nodes that share no filesystem
rank = os.environ["RANK"]
args = [a.replace("NODE", f"node{rank}") for a in sys.argv[1:]]
main(["train", *args])
"""


def test_checkpoints_without_a_shared_filesystem(tmp_path):
    """Two ranks whose output folders are different local paths: rank 0 writes the whole
    checkpoint, the other rank's RNG state included, rank 1 writes none (it wrote into a
    folder only rank 0 had made, and failed), and the resume reads it on rank 0 alone; so
    does a cooldown branch (rank 1 raised a TypeError: no checkpoint, no config)."""
    script = tmp_path / "local.py"
    script.write_text(LOCAL_FOLDERS)
    assert launch(1, *run_args(tmp_path, "straight", "schedule.kind=wsd")).returncode == 0
    args = run_args(tmp_path, "NODE", "--stop-at-step", "5", "schedule.kind=wsd")
    started = launch(2, *args, script=str(script))
    assert started.returncode == 0, started.stderr[-3000:]
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    checkpoint = node0 / "checkpoints/step-5"
    assert (checkpoint / "COMPLETE").is_file() and (checkpoint / "rng-rank1.pt").is_file()
    assert not (node1 / "checkpoints").exists() or not any((node1 / "checkpoints").iterdir())
    resumed = launch(2, "--phase", "resume", "--checkpoint", str(tmp_path / "NODE"), script=str(script))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(losses(tmp_path / "straight"), losses(node0), range(1, 11))
    assert (node0 / "final/model.safetensors").is_file()
    step5 = tmp_path / "NODE/checkpoints/step-5"
    branch = launch(2, "--phase", "cooldown", "--checkpoint", str(step5), "--steps", "2", script=str(script))
    assert branch.returncode == 0, branch.stderr[-3000:]
    assert list(losses(tmp_path / "node0-cooldown-step5-2")) == [6, 7]


SHARDED_PROBE = """
import json, os, sys
import torch
from smoltrain import model as model_module
from smoltrain.cli import main
seen = {"built_on": [], "matmul_weight_dtypes": set()}
real_init = model_module.CustomLLM.__init__
def init(self, config):
    real_init(self, config)
    seen["built_on"].append(self.embed_tokens.weight.device.type)
    def record(module, args):
        seen["matmul_weight_dtypes"].add(str(module.weight.dtype))
    self.layers[0].mlp.down_proj.register_forward_pre_hook(record)
model_module.CustomLLM.__init__ = init
main(["train", *sys.argv[1:]])
seen["matmul_weight_dtypes"] = sorted(seen["matmul_weight_dtypes"])
with open(os.environ["PROBE_OUT"] + os.environ["RANK"], "w") as f:
    json.dump(seen, f)
"""


def test_fsdp_builds_on_meta_and_computes_in_bf16(tmp_path, monkeypatch):
    """Rank 1 never holds the whole model (built on the meta device; its shards come from
    rank 0), and under bf16 the gathered weights are bf16 (MixedPrecisionPolicy) rather
    than fp32 weights cast by autocast in every matmul. A sample right after a step (no
    eval before it) decodes with bf16 keys in its cache (an fp32 cache made SDPA refuse)."""
    script = tmp_path / "probe.py"
    script.write_text(SHARDED_PROBE)
    monkeypatch.setenv("PROBE_OUT", str(tmp_path / "probe-"))
    args = run_args(
        tmp_path, "bf16", "train.fsdp=true", "train.precision=bf16", "--max-steps", "3", "log.sample_every=2"
    )
    result = launch(2, *args, script=str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"probe-{r}").read_text()) for r in (0, 1))
    # (rank 0 builds one more at the end: final/ is written from a plain model)
    assert rank0["built_on"][:2] == ["cpu", "meta"] and rank1["built_on"] == ["meta"]
    assert rank0["matmul_weight_dtypes"] == rank1["matmul_weight_dtypes"] == ["torch.bfloat16"]
    assert all(math.isfinite(v) for v in losses(tmp_path / "bf16").values())
    assert [r["step"] for r in metric_rows(tmp_path / "bf16") if "sample" in r] == [2, 3]


def rank_pids(tag: str) -> dict[int, int]:
    """PID of each rank of the launch whose environment carries SMOLTRAIN_TEST_TAG=tag."""
    import os

    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = dict(
                item.split("=", 1)
                for item in open(f"/proc/{entry}/environ").read().split("\0")
                if "=" in item
            )
        except OSError:
            continue
        if env.get("SMOLTRAIN_TEST_TAG") == tag and "RANK" in env and "LOCAL_RANK" in env:
            found[int(env["RANK"])] = int(entry)
    return found


def test_a_signal_to_one_rank_stops_all_on_the_same_step(tmp_path):
    """SIGTERM reaches one rank only (as a scheduler's may): every rank learns it with the
    step's figures, all checkpoint the same step and exit cleanly. Each rank used to decide
    alone: one entered the checkpoint's collectives while the other ran on, and they hung."""
    import os
    import signal
    import subprocess
    import sys

    tag = f"stop-{os.getpid()}"
    args = run_args(
        tmp_path, "stop", "--max-steps", "100000", "log.log_every=1", "log.checkpoint_every=100000"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "SMOLTRAIN_TEST_TAG": tag}
    launch = subprocess.Popen(
        [*cmd, "-m", "smoltrain", "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = tmp_path / "stop/metrics.jsonl"
        deadline = time.time() + 180
        while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 3) and time.time() < deadline:
            time.sleep(0.5)
        pids = rank_pids(tag)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGTERM)
        stdout, stderr = launch.communicate(timeout=180)
    finally:  # a hung launch must not outlive the test
        if launch.poll() is None:
            launch.kill()
            for pid in rank_pids(tag).values():
                os.kill(pid, signal.SIGKILL)
    assert launch.returncode == 0, stderr[-3000:]
    assert "received SIGTERM" in stderr
    latest = (tmp_path / "stop/checkpoints/latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert 3 <= step < 100000 and (tmp_path / f"stop/checkpoints/{latest}/rng-rank1.pt").is_file()
    assert max(losses(tmp_path / "stop")) == step  # both stopped where the checkpoint is


def test_shards_and_mixtures_follow_one_process_and_resume_across_counts(tmp_path):
    """Prepared shards: 2 processes = 1 (global batch fixed); a mixture of shards and an
    on-the-fly stream checkpointed by 2 processes resumes exactly on 1."""
    from smoltrain.data.shards import PrepareJob, prepare
    from tests.data.test_data import make_docs, write_jsonl

    docs = write_jsonl(tmp_path / "docs.jsonl", make_docs(300))
    tokenizer = small_vocabulary().split("=", 1)[1]  # the one run_args trains with
    prepare(
        PrepareJob(str(docs), str(tmp_path / "shards"), tokenizer, eval_every=10, shard_documents=64),
        progress=False,
    )
    shards = f"data.source={tmp_path / 'shards'}"
    one, two = launch(1, *run_args(tmp_path, "one", shards)), launch(2, *run_args(tmp_path, "two", shards))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert_close(losses(tmp_path / "one"), losses(tmp_path / "two"), range(1, 11))
    started = launch(2, *run_args(tmp_path, "2-then-1", shards, "--stop-at-step", "5"))
    assert started.returncode == 0, started.stderr[-3000:]
    assert launch(1, "--phase", "resume", "--checkpoint", str(tmp_path / "2-then-1")).returncode == 0
    assert_close(losses(tmp_path / "one"), losses(tmp_path / "2-then-1"), range(1, 11))

    mixture = f"data.mixture=[{{source: {tmp_path / 'shards'}, weight: 3}}, {{source: {docs}, weight: 1}}]"
    assert launch(1, *run_args(tmp_path, "mix", mixture)).returncode == 0
    started = launch(2, *run_args(tmp_path, "mix-2-then-1", mixture, "--stop-at-step", "5"))
    assert started.returncode == 0, started.stderr[-3000:]
    resumed = launch(1, "--phase", "resume", "--checkpoint", str(tmp_path / "mix-2-then-1"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(losses(tmp_path / "mix"), losses(tmp_path / "mix-2-then-1"), range(1, 11))


def test_benchmarks_on_two_processes_equal_one(tmp_path):
    """benchmarks.tasks on 2 processes: each scores half the items, rank 0 logs what 1 process logs."""
    from tests.lm_eval_tasks import write_tasks

    tasks = write_tasks(tmp_path / "tasks")
    extra = [
        "benchmarks.tasks=[arc_easy_local,piqa_local]",
        "benchmarks.every=5",
        f"benchmarks.include_path={tasks}",
    ]
    one, two = launch(1, *run_args(tmp_path, "one", *extra)), launch(2, *run_args(tmp_path, "two", *extra))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    rows = {
        name: [r for r in metric_rows(tmp_path / name) if "arc_easy_local/acc" in r]
        for name in ("one", "two")
    }
    assert [r["step"] for r in rows["one"]] == [5, 10]
    for a, b in zip(rows["one"], rows["two"], strict=True):
        assert {k: v for k, v in a.items() if "/" in k} == {k: v for k, v in b.items() if "/" in k}


def test_muon_under_ddp_and_fsdp_follows_one_process_and_resumes(tmp_path):
    """Muon's Newton-Schulz on whole matrices: under DDP each rank has them; under FSDP2 the
    sharded matrices' products run as DTensor ops. Both follow one process, and an FSDP
    checkpoint (Muon's momentum gathered) resumes on one process. Newton-Schulz runs in bf16,
    so the all-reduce's other summation order shows sooner than under AdamW: 1e-3, not 1e-5."""
    muon = ("optim.name=muon", "optim.muon_lr=0.02")
    one = launch(1, *run_args(tmp_path, "one", *muon))
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = launch(2, *run_args(tmp_path, "ddp", *muon))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = launch(2, *run_args(tmp_path, "fsdp", *muon, "train.fsdp=true", "--stop-at-step", "5"))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    resumed = launch(1, "--phase", "resume", "--checkpoint", str(tmp_path / "fsdp"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = losses(tmp_path / "one")
    assert_close(reference, losses(tmp_path / "ddp"), range(1, 11), tolerance=1e-3)
    assert_close(reference, losses(tmp_path / "fsdp"), range(1, 11), tolerance=1e-3)
