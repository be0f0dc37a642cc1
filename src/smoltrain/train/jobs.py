"""What runs between steps when it is due: the log line, held-out loss, benchmarks, samples,
the time budget, checkpoints; and the end of a run."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch

from smoltrain.data.stream import conversation_counts
from smoltrain.device import autocast
from smoltrain.evaluation.holdout import evaluate, held_out_batches, sample
from smoltrain.formats.model_io import model_skeleton
from smoltrain.generate import prepare_for_generation
from smoltrain.model import CustomLLM
from smoltrain.train.checkpoint import (
    checkpoint_root,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from smoltrain.train.lora import ADAPTER, has_adapters, merge_adapters
from smoltrain.train.metrics import (
    plot_branches,
    plot_losses,
    print_end,
)
from smoltrain.train.output import export_final
from smoltrain.train.setup import Run, Window
from smoltrain.train.step import StepResult, roll_back_if_spiking


def _due(run: Run, every: int) -> bool:
    return run.state.step % every == 0 or run.state.step == run.end_step


def log_progress(run: Run, result: StepResult) -> None:
    """The log line: the window's mean loss, speed and MFU since the last one."""
    step, window = run.state.step, run.window
    tok_s = window.steps * run.tokens_per_step / (time.perf_counter() - window.start)
    run.last = {
        "loss": window.loss / window.steps,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "tokens_per_s": tok_s,
        "mfu": tok_s * run.flops_per_token / (run.peak_flops * run.accelerator.num_processes),
        "tokens": run.state.tokens,
    }
    by_source = run.loader.source_tokens() if hasattr(run.loader, "source_tokens") else {}
    run.metrics.write(step, **run.last, **({"source_tokens": by_source} if len(by_source) > 1 else {}))
    run.bar.set_postfix(loss=f"{run.last['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
    run.window = Window()


def evaluate_and_log(run: Run) -> None:
    if run.held_out is None:
        run.held_out = held_out_batches(
            run.cfg.data,
            run.tokenizer,
            run.accelerator,
            run.cfg.train.micro_batch_size,
            run.cfg.log.eval_batches,
        )
    eval_loss, bpb = evaluate(
        run.model, run.accelerator, run.held_out, run.cfg.log.eval_batches, run.fsdp, run.precision
    )
    run.last["eval_loss"], run.last["eval_bpb"] = eval_loss, bpb
    perplexity = math.exp(min(eval_loss, 50))
    run.metrics.write(
        run.state.step, eval_loss=eval_loss, perplexity=perplexity, eval_bpb=bpb, tokens=run.state.tokens
    )
    if run.accelerator.is_main_process:
        figures = f"perplexity {perplexity:.1f}, {bpb:.3f} bits/byte"
        run.bar.write(f"step {run.state.step}: eval loss {eval_loss:.3f} ({figures})")


def benchmark_and_log(run: Run) -> None:
    """lm-eval's tasks (benchmarks.tasks) on the model as it is now, every rank scoring its share;
    scores go to metrics.jsonl and the trackers as task/metric. The global RNG is put back
    afterwards (lm-eval seeds it), so a run with benchmarks trains as one without."""
    from smoltrain.evaluation.benchmarks import SmolLM, evaluate_tasks, scores

    b, step = run.cfg.benchmarks, run.state.step
    start, rng = time.perf_counter(), rng_state()
    model = run.model if run.fsdp else run.raw_model
    model.eval()
    try:
        lm = SmolLM(
            model,
            run.tokenizer,
            batch_size=b.batch_size,
            amp=lambda: autocast(model.device.type, run.precision),
        )
        results = evaluate_tasks(
            lm,
            b.tasks,
            b.include_path,
            b.limit,
            b.num_fewshot,
            quiet=True,
            apply_chat_template=b.apply_chat_template,
            system_instruction=b.system_instruction,
        )
    finally:
        model.train()
        set_rng_state(rng)
    seconds = time.perf_counter() - start
    if results is None:  # ranks other than 0
        return
    found = scores(results)
    run.last.update(found)
    run.metrics.write(step, tokens=run.state.tokens, benchmark_s=seconds, **found)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in found.items() if not k.endswith("_stderr"))
    run.bar.write(f"step {step}: {shown} ({seconds:.0f}s)")


def sample_and_log(run: Run) -> None:
    # a sharded model generates on every rank together; otherwise rank 0 alone
    is_main, log = run.accelerator.is_main_process, run.cfg.log
    text = ""
    if run.fsdp or is_main:
        model = run.raw_model
        if log.sample_quantize != "off":  # a quantized copy, as `smoltrain generate --quantize` decodes
            model = quantized_copy(model, log.sample_quantize)
        text = sample(
            model,
            run.tokenizer,
            log.sample_prompt,
            log.sample_tokens,
            log.sample_temperature,
            log.sample_top_k,
            run.cfg.train.seed,
            chat=run.cfg.data.format == "chat",
        )
    run.metrics.write(run.state.step, sample=text)
    if is_main:
        run.bar.write(f"step {run.state.step} sample: {text!r}")


def quantized_copy(model: CustomLLM, kind: str) -> CustomLLM:
    """The training model's weights (adapters merged) in a plain model prepared for generation
    with `kind` quantization; the training model is untouched. Only merging adapters needs a
    copy of it first: the load below copies the weights anyway (a deep copy before it held a
    third copy of them at the sample's peak)."""
    trained = merge_adapters(copy.deepcopy(model)) if has_adapters(model) else model
    plain = model_skeleton(trained.config)
    plain.to_empty(device="cpu").load_state_dict(trained.state_dict())
    plain.rotary_emb.reset_parameters()  # buffers, not in the state dict
    return prepare_for_generation(plain, quantize=kind)


# schedule.max_minutes: the steps timed before the schedule's length is fixed (the first,
# which warms up allocators and caches, is left out)
BUDGET_PROBE_STEPS = 4


def fit_schedule_to_time(run: Run) -> None:
    """schedule.max_minutes: from the speed of steps 2..BUDGET_PROBE_STEPS, fix max_steps to
    the most steps that end within the budget, the final eval included (rank 0 decides for
    all). Only what follows the warmup depends on max_steps, so with warmup past this step
    the run is the one a plain max_steps of that length would give. The run's config copy
    holds the result (and no budget), so a resume continues the same schedule."""
    cfg, step = run.cfg, run.state.step
    now = time.perf_counter()
    step_s = (now - run.first_step_done) / (step - run.start_step - 1)
    if run.start_eval_s:
        eval_s = run.start_eval_s
    else:  # forward only: about a third of a training step's work per token
        eval_tokens = cfg.log.eval_batches * cfg.train.micro_batch_size * cfg.data.context_length
        eval_s = eval_tokens / (run.tokens_per_step / run.accelerator.num_processes) * step_s / 3
    left = cfg.schedule.max_minutes * 60 - (now - run.started) - eval_s
    fitted = [min(cfg.schedule.max_steps, max(step + 1, step + int(left / step_s)))]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(fitted)
    schedule = dataclasses.replace(cfg.schedule, max_steps=fitted[0], max_minutes=None)
    run.cfg = dataclasses.replace(cfg, schedule=schedule)
    if run.end_step == cfg.schedule.max_steps:
        run.end_step = fitted[0]
    run.bar.total = run.end_step
    run.bar.refresh()
    run.metrics.write(step, fitted_max_steps=fitted[0], step_s=step_s)
    if run.accelerator.is_main_process:
        run.bar.write(
            f"schedule.max_minutes {cfg.schedule.max_minutes:g}: {fitted[0]:,} steps of {step_s:.2f}s fit "
            f"(max_steps {cfg.schedule.max_steps:,})"
        )


def checkpoint_now(run: Run) -> Path:
    now = time.perf_counter()
    run.state.elapsed += now - run.segment_start
    run.segment_start = now
    return save_checkpoint(
        run.accelerator,
        run.model,
        run.torch_optimizers,
        run.loader,
        run.cfg,
        run.state,
        run.tokenizer,
        run.scaler,
        run.spike_guard,
    )


def run_periodic_jobs(run: Run, result: StepResult) -> None:
    """After a step: the progress bar; log, evaluate, sample and checkpoint when due (and a
    checkpoint when some rank was asked to stop). After a skipped step only the spike
    guard's rollback, when due, or the stop's checkpoint. Their time is not counted in the
    next log line's speed."""
    cfg, step, stopping = run.cfg, run.state.step, result.stop
    run.bar.update(step - run.bar.n)  # skipped steps count; a rollback moves it back
    if result.skipped:  # nothing new to log or evaluate
        if stopping:
            checkpoint_now(run)
        else:
            roll_back_if_spiking(run)
        return
    if cfg.train.compile and step == run.start_step + 1 and run.accelerator.is_main_process:
        compile_s = time.perf_counter() - run.segment_start  # the first step compiles the model
        run.metrics.write(step, compile_s=compile_s)
        run.bar.write(f"torch.compile: the first step took {compile_s:.1f}s, compilation included")
    if step == run.start_step + 1:
        run.first_step_done = time.perf_counter()
    elif cfg.schedule.max_minutes and run.first_step_done and step >= run.start_step + BUDGET_PROBE_STEPS:
        fit_schedule_to_time(run)  # once: the run's config holds no budget after it
        cfg = run.cfg
    if _due(run, run.log_every):
        log_progress(run, result)
    stage_steps = getattr(run.loader, "stage_steps", [])
    if step in stage_steps:  # data.stages: the next step draws from the next mixture
        stage = stage_steps.index(step) + 1
        mixture = ", ".join(f"{e.source} x{e.weight:g}" for e in cfg.data.stages[stage].mixture)
        run.metrics.write(step, stage=stage)
        if run.accelerator.is_main_process:
            run.bar.write(
                f"step {step}: stage {stage + 1} of {len(cfg.data.stages)} from the next step: {mixture}"
            )
    jobs_start = time.perf_counter()
    if _due(run, cfg.log.eval_every):
        evaluate_and_log(run)
    if cfg.benchmarks.tasks and _due(run, cfg.benchmarks.every):
        benchmark_and_log(run)
    if _due(run, cfg.log.sample_every):
        sample_and_log(run)
    every = cfg.train.mps_empty_cache_every
    if run.accelerator.device.type == "mps" and every and step % every == 0:
        torch.mps.empty_cache()
    if _due(run, cfg.log.checkpoint_every) or stopping:
        checkpoint_now(run)
    run.window.start += time.perf_counter() - jobs_start


def finish(run: Run, interrupted: bool) -> dict[str, Any]:
    """Export final/ when the schedule is done, plot, print and return the summary."""
    run.bar.close()
    state, out = run.state, run.out
    state.elapsed += time.perf_counter() - run.segment_start
    summary = {
        "step": state.step,
        "loss": run.last.get("loss"),
        "eval_loss": run.last.get("eval_loss"),
        "eval_bpb": run.last.get("eval_bpb"),
        "start_eval_loss": run.start_eval_loss,
        "seconds": state.elapsed,
        "skipped_steps": state.skipped_steps,
        "overflow_steps": state.overflow_steps,
        "spike_steps": state.spike_steps,
        "rollbacks": state.rollbacks,
        "output_dir": str(out),
        "interrupted": interrupted,
        "benchmarks": {k: v for k, v in run.last.items() if "/" in k},  # the latest benchmarks.tasks scores
    }
    if run.cfg.data.format == "chat":
        summary["conversations"] = conversation_counts(run.loader.state_dict())
    if state.step >= run.cfg.schedule.max_steps and state.step >= run.end_step and not interrupted:
        lora = run.cfg.train.lora if has_adapters(run.raw_model) else None
        export_final(
            run.raw_model,
            run.accelerator,
            run.fsdp,
            out,
            run.tokenizer,
            run.cfg.export.gguf,
            lora,
            run.cfg.model.init_from,
        )
        if lora is not None and lora.save_adapter:
            summary["adapter"] = str(out / ADAPTER)
        summary["final"] = str(out / "final")
        if run.cfg.export.gguf:
            summary["final_gguf"] = str(out / "final.gguf")
    if run.accelerator.is_main_process:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        if run.branch_of is not None:
            plot_branches(run.branch_of, out / "branches.png")
        print_end(summary, out, checkpoint_root(out))
    run.metrics.close()
    # all ranks tear the process group down together: a rank that exits while another still
    # exports can die in gloo's teardown (SIGABRT, "terminate called without an active exception")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    if run.lock:
        run.lock.release()
    return summary
