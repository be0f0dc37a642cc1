import atexit
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smoltrain.train.config import ScheduleConfig, load_config
from smoltrain.train.optim import lr_at

REPO = Path(__file__).resolve().parents[2]


def write_corpus(path: Path, n: int = 200) -> Path:
    import random

    rng = random.Random(0)
    words = "the model reads text and learns which word comes next in a long stream of tokens".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {"text": f"{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))}
                )
                + "\n"
            )
    return path


@functools.cache
def small_vocabulary() -> str:
    """`tokenizer=FOLDER` for a 512-token BPE learned on write_corpus's words, made once per
    process. With SmolLM2's 49,152 tokens a test's tiny model spends ~98% of each step in
    its head: on a CPU without fast matmuls the long end-to-end tests then took minutes."""
    from smoltrain.tokenizer import train_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="smoltrain-test-tokenizer-"))
    atexit.register(shutil.rmtree, folder, True)  # the process's tests share it to the end
    corpus = write_corpus(folder / "corpus.jsonl", 400)
    documents = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    train_tokenizer(documents, 512).save_pretrained(folder / "tokenizer")
    return f"tokenizer={folder / 'tokenizer'}"


def small_run_args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_corpus(corpus)
    return [
        "--config",
        str(REPO / "configs/quickstart.yaml"),
        "--output-dir",
        str(tmp_path / out),
        "--device",
        "cpu",
        f"data.source={corpus}",
        "tokenizer=smollm2",  # the quickstart's own is trained by make demo
        "data.context_length=32",
        "data.shuffle_buffer=8",
        "data.holdout_every=10",
        "model.overrides.num_hidden_layers=1",
        "model.overrides.hidden_size=64",
        "model.overrides.intermediate_size=128",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=2",
        "train.precision=fp32",
        "train.peak_flops=1e11",
        "schedule.warmup_steps=2",
        "log.eval_batches=2",
        "log.progress_bar=false",
        *extra,
    ]


def smoltrain(*args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "smoltrain", "train", *args], capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(out) if "loss" in r}


def test_reference_schedule():
    s = ScheduleConfig(kind="linear", warmup_steps=500, max_steps=5000)
    assert math.isclose(lr_at(100, 2e-4, s), 4e-5)
    assert math.isclose(lr_at(500, 2e-4, s), 2e-4)
    assert math.isclose(lr_at(600, 2e-4, s), 1.9556e-4, rel_tol=1e-4)
    assert lr_at(5000, 2e-4, s) == 0.0
    s.past_end_lr = 2e-5
    assert lr_at(5001, 2e-4, s) == 2e-5
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert math.isclose(lr_at(60, 1.0, cos), 0.55) and math.isclose(lr_at(110, 1.0, cos), 0.1)
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, max_steps=110, decay_fraction=0.2)
    assert (
        lr_at(90, 1.0, wsd) == 1.0 and math.isclose(lr_at(100, 1.0, wsd), 0.5) and lr_at(110, 1.0, wsd) == 0.0
    )


def test_reference_config_is_the_reference_run():
    cfg = load_config(REPO / "configs/smollm2-135m-cosmopedia.yaml")
    assert cfg.model.preset == "smollm2-135m" and cfg.model.build_config().num_params() == 134_515_008
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.data.context_length) == (4, 8, 256)
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (2e-4, 0.01)
    assert (cfg.schedule.kind, cfg.schedule.warmup_steps, cfg.schedule.max_steps) == ("linear", 500, 5000)
    assert (cfg.log.log_every, cfg.log.eval_every, cfg.log.sample_every) == (100, 500, 500)
    assert cfg.data.source == "hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2"
    assert (cfg.resume.extra_steps, cfg.resume.log_every) == (50, 10)


def test_gpu_config_is_the_reference_model_at_context_2048():
    cfg = load_config(REPO / "configs/smollm2-135m-cosmopedia-gpu.yaml")
    reference = load_config(REPO / "configs/smollm2-135m-cosmopedia.yaml")
    assert cfg.model == reference.model and cfg.data.source == reference.data.source
    assert (cfg.data.context_length, cfg.train.precision, cfg.train.compile) == (2048, "auto", True)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.context_length
    assert tokens == 131_072 and cfg.schedule.warmup_steps < cfg.schedule.max_steps


def test_unknown_config_key_names_the_nearest():
    with pytest.raises(ValueError, match="did you mean 'optim.lr'|Did you mean.*lr"):
        load_config(overrides=["optim.lrr=1"])
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        load_config(overrides=["model.overrides.hiden_size=64"])
    result = smoltrain(
        "--config", str(REPO / "configs/quickstart.yaml"), "train.micro_batchsize=2", check=False
    )
    assert result.returncode != 0 and "micro_batch_size" in result.stderr and "Traceback" not in result.stderr


def test_exact_resume_is_bitwise(tmp_path):
    smoltrain(*small_run_args(tmp_path, "straight", "--max-steps", "8", "log.log_every=1"))
    smoltrain(
        *small_run_args(tmp_path, "resumed", "--max-steps", "8", "log.log_every=1", "--stop-at-step", "4")
    )
    assert (tmp_path / "resumed/checkpoints/step-4/COMPLETE").is_file()
    assert not (tmp_path / "resumed/final").exists()  # stopping early is not the end of the run
    smoltrain("--phase", "resume", "--checkpoint", str(tmp_path / "resumed/checkpoints/latest"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert list(straight) == list(range(1, 9)) and list(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert straight[step] == resumed[step], step  # bitwise: the same float
    assert straight[8] < straight[1]


def test_accumulation_equals_one_big_batch(tmp_path):
    smoltrain(
        *small_run_args(
            tmp_path,
            "accum",
            "--max-steps",
            "1",
            "train.micro_batch_size=4",
            "train.grad_accum_steps=8",
            "optim.grad_clip=0",
            "data.shuffle_buffer=0",
        )
    )
    smoltrain(
        *small_run_args(
            tmp_path,
            "big",
            "--max-steps",
            "1",
            "train.micro_batch_size=32",
            "train.grad_accum_steps=1",
            "optim.grad_clip=0",
            "data.shuffle_buffer=0",
        )
    )
    a = load_file(tmp_path / "accum/final/model.safetensors")
    b = load_file(tmp_path / "big/final/model.safetensors")
    init = None
    for key in a:
        # 1% of the step's lr: sums of 8 micro-batches and of one batch round differently with
        # the vector width (AVX2: up to 4e-6 where Adam divides a near-zero gradient's moments)
        assert torch.allclose(a[key], b[key], atol=1e-5), (key, (a[key] - b[key]).abs().max())
    assert init is None and not torch.equal(a["model.norm.weight"], torch.ones_like(a["model.norm.weight"]))


def test_final_folder_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smoltrain.formats.model_io import load_model

    smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "3", "log.trackers=[tensorboard]"))
    out = tmp_path / "run"
    assert list(out.rglob("events.out.tfevents.*")), "TensorBoard wrote no event file"
    for name in ("metrics.jsonl", "loss.png", "final/model.safetensors", "final/tokenizer.json"):
        assert (out / name).is_file(), name
    rows = metric_rows(out)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(rows[0])
    assert any("eval_loss" in r and "perplexity" in r for r in rows)
    assert any(r.get("sample", "").startswith("The future of AI is") for r in rows)
    hf = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ours = load_model(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("The model reads", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() < 1e-5
    # a step-N checkpoint is itself a model folder
    step = (out / "checkpoints/latest").read_text().strip()
    assert load_model(out / "checkpoints" / step).num_parameters() == ours.num_parameters()


def test_refuses_to_overwrite_another_run(tmp_path):
    smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "1"))
    again = smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "1"), check=False)
    assert again.returncode != 0 and "already holds a run; pass --overwrite" in again.stderr
    smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "1", "--overwrite"))


def test_resume_errors(tmp_path):
    smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "2"))
    ckpt = tmp_path / "run/checkpoints/step-2"
    other = smoltrain(
        "--phase", "resume", "--checkpoint", str(ckpt), "model.overrides.hidden_size=128", check=False
    )
    assert other.returncode != 0 and "resume with the same model config" in other.stderr
    missing = smoltrain("--phase", "resume", "--checkpoint", str(tmp_path / "nope"), check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    (ckpt / "COMPLETE").unlink()
    corrupt = smoltrain("--phase", "resume", "--checkpoint", str(ckpt), check=False)
    assert corrupt.returncode != 0 and "incomplete" in corrupt.stderr and "interrupted" in corrupt.stderr
    assert "Traceback" not in missing.stderr + corrupt.stderr + other.stderr


def test_resume_of_finished_run_adds_the_extra_steps(tmp_path):
    smoltrain(
        *small_run_args(
            tmp_path,
            "run",
            "--max-steps",
            "4",
            "resume.extra_steps=3",
            "resume.log_every=1",
            "schedule.past_end_lr=1e-4",
        )
    )
    smoltrain("--phase", "resume", "--checkpoint", str(tmp_path / "run"))
    rows = metric_rows(tmp_path / "run")
    extra = [r for r in rows if "lr" in r and r["step"] > 4]
    assert [r["step"] for r in extra] == [5, 6, 7] and all(r["lr"] == 1e-4 for r in extra)


def test_non_finite_loss_skips_then_stops(tmp_path):
    result = smoltrain(
        *small_run_args(
            tmp_path,
            "nan",
            "--max-steps",
            "10",
            "optim.lr=1e30",
            "optim.grad_clip=0",
            "schedule.warmup_steps=0",
            "train.max_bad_steps=2",
            "log.checkpoint_every=1",
            "log.log_every=1",
        ),
        check=False,
    )
    assert result.returncode != 0
    assert "non-finite steps in a row" in result.stderr and "not finite; skipped" in result.stderr
    latest = (tmp_path / "nan/checkpoints/latest").read_text().strip()
    assert (tmp_path / "nan/checkpoints" / latest / "COMPLETE").is_file()


KILL_SCRIPT = """
import os, signal, sys
import torch
mode = sys.argv[1]
real_save = torch.save  # torch.save itself: accelerate's save_state calls it too
def save(obj, path, *a, **k):
    if ".step-4.tmp" in str(path):  # inside the second checkpoint, after the first completed
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(28, "No space left on device")
    return real_save(obj, path, *a, **k)
torch.save = save
from smoltrain.cli import main
main(["train", *sys.argv[2:]])
"""


@pytest.mark.parametrize("mode", ["kill", "disk-full"])
def test_crash_while_checkpointing_keeps_the_previous_one(tmp_path, mode):
    args = small_run_args(tmp_path, "run", "--max-steps", "6", "log.checkpoint_every=2")
    result = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, mode, *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    root = tmp_path / "run/checkpoints"
    assert (root / "latest").read_text().strip() == "step-2"
    assert (root / "step-2/COMPLETE").is_file() and not (root / "step-4").exists()
    if mode == "disk-full":
        assert "no space left on the device" in result.stderr and "step-2" in result.stderr
        assert not (root / ".step-4.tmp").exists()
    # and the run resumes from the intact checkpoint to the end
    smoltrain("--phase", "resume", "--checkpoint", str(root / "latest"))
    assert (tmp_path / "run/final/model.safetensors").is_file()
    assert not list(root.glob(".step-*.tmp"))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    args = small_run_args(
        tmp_path, "run", "--max-steps", "100000", "log.log_every=1", "log.checkpoint_every=100000"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "smoltrain", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "saving a checkpoint" in err
    latest = (tmp_path / "run/checkpoints/latest").read_text().strip()
    last_logged = max(losses(tmp_path / "run"))
    assert latest == f"step-{last_logged}"
    assert os.path.isfile(tmp_path / "run/checkpoints" / latest / "COMPLETE")


def test_continued_pretraining_from_smollm2(tmp_path):
    """init_from the bundled SmolLM2: its architecture and weights, not the preset's."""
    smoltrain(
        *small_run_args(
            tmp_path,
            "cont",
            "--max-steps",
            "2",
            "model.init_from=smollm2",
            "log.log_every=1",
            "optim.lr=1e-5",
            "train.grad_accum_steps=1",
            "log.sample_tokens=4",
            "data.source=builtin:python-docs",
            "data.context_length=64",
        )
    )
    first_loss = losses(tmp_path / "cont")[1]
    assert first_loss < 5.0  # a trained model on English prose, not ln(49152) = 10.8
    config = json.loads((tmp_path / "cont/final/config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["rope_parameters"]["rope_theta"] == 100000.0


def test_compiled_model_trains_like_eager(tmp_path):
    common = ("--max-steps", "3", "log.log_every=1", "train.grad_accum_steps=1", "log.eval_batches=1")
    smoltrain(*small_run_args(tmp_path, "eager", *common))
    smoltrain(*small_run_args(tmp_path, "compiled", *common, "train.compile=true"))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    for step in (1, 2, 3):
        assert math.isclose(eager[step], compiled[step], rel_tol=1e-5), step
    assert [r["step"] for r in metric_rows(tmp_path / "compiled") if "compile_s" in r] == [1]


def small_run_config(tmp_path: Path, *extra: str):
    """small_run_args as a loaded config, for calling the loop's pieces from Python."""
    from smoltrain.train.overrides import config_for_cli

    args = small_run_args(tmp_path, "py", *extra)
    return config_for_cli(args[1], args[6:], "init", None, {"output_dir": args[3], "train.device": "cpu"})


def test_train_step_alone_and_the_non_finite_policy(tmp_path):
    """train_step on a run from setup_run: a good step updates the weights and counts its
    tokens; a non-finite loss skips the update but counts the step, and max_bad_steps of
    them in a row stop the run with a message naming the fix."""
    from smoltrain.errors import TrainingError
    from smoltrain.train.setup import setup_run
    from smoltrain.train.step import train_step

    cfg = small_run_config(
        tmp_path, "train.global_batch_size=6", "train.max_bad_steps=2", "schedule.max_steps=5"
    )
    before = json.dumps(cfg.to_dict(), sort_keys=True)
    run = setup_run(cfg)
    assert run.grad_accum_steps == 3 and run.tokens_per_step == 2 * 3 * 32
    assert json.dumps(cfg.to_dict(), sort_keys=True) == before  # the caller's config untouched
    weights = run.raw_model.embed_tokens.weight.detach().clone()
    result = train_step(run)
    assert not result.skipped and math.isfinite(result.loss) and result.grad_norm > 0
    assert run.state.step == 1 and run.state.tokens == run.tokens_per_step
    assert not torch.equal(weights, run.raw_model.embed_tokens.weight)

    real_forward = run.forward

    def nan_loss(**batch):
        out = real_forward(**batch)
        out.loss = out.loss * float("nan")
        return out

    run.forward = nan_loss
    weights = run.raw_model.embed_tokens.weight.detach().clone()
    assert train_step(run).skipped
    assert torch.equal(weights, run.raw_model.embed_tokens.weight)  # no update
    assert all(p.grad is None for p in run.raw_model.parameters())  # nothing carried over
    assert (run.state.step, run.state.skipped_steps, run.state.tokens) == (2, 1, run.tokens_per_step)
    with pytest.raises(TrainingError, match="2 non-finite steps in a row.*lower optim.lr"):
        train_step(run)
    run.metrics.close()


def test_start_summary_names_the_kernels_and_the_process_settings(tmp_path):
    result = smoltrain(*small_run_args(tmp_path, "auto", "--max-steps", "1", "train.precision=bf16"))
    kernels = next(line for line in result.stdout.splitlines() if line.strip().startswith("kernels"))
    for name in ("chunked_loss", "mlp", "attention", "rms_norm"):
        assert name in kernels
    process = next(line for line in result.stdout.splitlines() if line.strip().startswith("process"))
    assert "glibc keeps freed memory" in process and "tcache off" in process
    result = smoltrain(
        *small_run_args(tmp_path, "off", "--max-steps", "1", "train.kernels=off", "train.tune_malloc=false")
    )
    assert "kernels     none (the plain model)" in result.stdout
    assert "device      cpu (one process), precision" in result.stdout  # was "cpu (NO)"
    assert "process     as started" in result.stdout
    result = smoltrain(*small_run_args(tmp_path, "bad", "train.kernels=fast"), check=False)
    assert (
        result.returncode != 0
        and "train.kernels 'fast' is unknown; use auto, off or a comma-separated list" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_a_run_with_eval_sample_and_checkpoint_obeys_mps_rules(tmp_path):
    """Nothing in a training step, an eval, a sample or a checkpoint makes a float64 tensor
    (the first eval on a Mac raised before any checkpoint was written)."""
    from smoltrain.train.loop import train
    from tests.device_rules import MPSRules

    cfg = small_run_config(
        tmp_path, "schedule.max_steps=2", "log.eval_every=1", "log.sample_every=2", "log.checkpoint_every=1"
    )
    with MPSRules():
        summary = train(cfg)
    assert summary["eval_loss"] is not None and (tmp_path / "py/checkpoints/step-2/COMPLETE").is_file()
    with pytest.raises(AssertionError, match="float64"):
        with MPSRules():
            torch.zeros(2, dtype=torch.float64)


@pytest.mark.slow
def test_fp16_with_loss_scaling_on_cpu_survives_overflows_and_tracks_fp32(tmp_path):
    """fp16 autocast with a GradScaler runs on CPU (it was refused: "needs CUDA"). At the
    default scale it tracks fp32 step by step; from a scale that overflows, the overflowed
    batches are retried at half the scale (a skipped step once crashed the next unscale),
    the run reaches its last step and ends near fp32's loss; the scale is checkpointed."""
    steps = ["--max-steps", "24", "log.log_every=1", "log.eval_every=100", "log.checkpoint_every=12"]
    steps.append(small_vocabulary())  # fp16 is emulated on most CPUs: a small head keeps it quick
    smoltrain(*small_run_args(tmp_path, "fp32", *steps))
    smoltrain(*small_run_args(tmp_path, "fp16", *steps, "train.precision=fp16"))
    overflow = smoltrain(
        *small_run_args(tmp_path, "overflow", *steps, "train.precision=fp16", "train.loss_scale=1e9")
    )
    fp32, fp16, scaled = losses(tmp_path / "fp32"), losses(tmp_path / "fp16"), losses(tmp_path / "overflow")
    assert list(fp16) == list(scaled) == list(range(1, 25))
    for step in fp32:
        assert abs(fp16[step] - fp32[step]) < 1e-2 * fp32[step], (step, fp16[step], fp32[step])
    assert "fp16 gradients overflowed at loss scale 1e+09; skipped" in overflow.stderr
    assert "fp16 overflows retried at a lower scale" in overflow.stdout
    assert abs(scaled[24] - fp32[24]) < 0.1 * fp32[24], (scaled[24], fp32[24])
    state = json.loads((tmp_path / "overflow/checkpoints/step-24/trainer_state.json").read_text())
    assert 1 <= state["grad_scaler"]["scale"] < 1e9 and state["state"]["overflow_steps"] >= 5


def test_one_host_sync_per_step_at_most(tmp_path, monkeypatch):
    """On a GPU, every read of a device value on the host waits for the device: a step may
    make one (the logged loss and grad norm), no micro-batch any. Counted over N and 2N
    steps with 4 micro-batches (the chunked loss's `if underflow.any()` made 8 a step)."""
    from smoltrain.train.jobs import run_periodic_jobs
    from smoltrain.train.setup import setup_run
    from smoltrain.train.step import train_step
    from tests.device_rules import CountHostSyncs, reads_cost_a_sync

    reads_cost_a_sync(monkeypatch)
    cfg = small_run_config(tmp_path, "train.grad_accum_steps=4", "schedule.max_steps=20", "log.log_every=1")
    run = setup_run(cfg)
    run_periodic_jobs(run, train_step(run))  # the first step's one-off work
    counts = []
    for n in (3, 6):
        with CountHostSyncs() as syncs:
            for _ in range(n):
                run_periodic_jobs(run, train_step(run))
        counts.append(syncs.count)
    run.metrics.close()
    assert counts[1] - counts[0] <= 3, counts


def test_max_minutes_fits_the_schedule_to_the_time_and_resume_keeps_it(tmp_path):
    """schedule.max_minutes: after the first steps the run fixes max_steps to what fits (the
    cap stays max_steps), finishes that schedule (final/, the decay done), and its
    checkpoints hold the fitted length with no budget, so a resume continues that schedule."""
    from smoltrain.train.checkpoint import checkpoint_config, resolve_checkpoint_dir
    from smoltrain.train.loop import train

    cfg = small_run_config(
        tmp_path, "schedule.max_steps=100000", "schedule.max_minutes=0.1", "log.checkpoint_every=10"
    )
    summary = train(cfg)
    fitted = next(r for r in metric_rows(tmp_path / "py") if "fitted_max_steps" in r)
    assert fitted["step"] == 4 and 4 < fitted["fitted_max_steps"] < 100000
    assert summary["step"] == fitted["fitted_max_steps"] and summary["final"]
    saved = checkpoint_config(resolve_checkpoint_dir(tmp_path / "py"))
    assert saved["schedule"]["max_steps"] == summary["step"] and saved["schedule"]["max_minutes"] is None
    assert cfg.schedule.max_minutes == 0.1 and cfg.schedule.max_steps == 100000  # the caller's: unchanged
    capped = small_run_config(tmp_path, "schedule.max_steps=6", "schedule.max_minutes=60")
    capped = dataclasses.replace(capped, output_dir=str(tmp_path / "cap"))
    assert train(capped)["step"] == 6
    with pytest.raises(ValueError, match="schedule.max_minutes must be above 0"):
        small_run_config(tmp_path, "schedule.max_minutes=0")


def test_the_held_out_set_is_read_once_per_run(tmp_path, monkeypatch):
    """Every eval re-read the source to find its held-out documents (a hub stream: ~190k
    documents for 1 in 200 held out); now the first eval keeps its batches for the rest."""
    from smoltrain.evaluation import holdout
    from smoltrain.train import loop, setup

    opened = []
    real = setup.build_loader
    for module in (setup, holdout):  # the start-up data check, the held-out batches
        monkeypatch.setattr(
            module,
            "build_loader",
            lambda cfg, tok, bs, split="train", *a, **k: (
                opened.append(split) or real(cfg, tok, bs, split, *a, **k)
            ),
        )
    cfg = small_run_config(tmp_path, "schedule.max_steps=6", "log.eval_every=2")
    loop.train(cfg)
    evals = [r["eval_loss"] for r in metric_rows(tmp_path / "py") if "eval_loss" in r]
    # one read by the start-up data check, one for all three evals (before: one per eval)
    assert len(evals) == 3 and opened.count("eval") == 2, opened


def test_overwrite_clears_what_a_run_writes_and_nothing_else(tmp_path):
    """RUN_FILES listed run.json, which nothing writes, and missed a cooldown's branches.png."""
    from smoltrain.train.output import RUN_FILES, clear_old_run

    for name in RUN_FILES:
        (tmp_path / name).write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    clear_old_run(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and "branches.png" in RUN_FILES
