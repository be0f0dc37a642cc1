"""A run's output folder: the files a run writes (`RUN_FILES`), taking and clearing a folder,
and the final export."""

from __future__ import annotations

import shutil
from pathlib import Path

from smoltrain.atomic import staged_folder
from smoltrain.errors import TrainingError
from smoltrain.formats.model_io import save_model
from smoltrain.model.model import CustomLLM
from smoltrain.train.checkpoint import (
    CHECKPOINTS,
    COMPLETE,
)
from smoltrain.train.config import LoraConfig, TrainConfig
from smoltrain.train.lora import ADAPTER, add_adapters, merge_adapters, save_adapter
from smoltrain.train.parallel import (
    full_model_state,
)


def export_final(
    model: CustomLLM,
    accelerator,
    fsdp: bool,
    out: Path,
    tokenizer,
    gguf: str | None = None,
    lora: LoraConfig | None = None,
    base: str | None = None,
) -> None:
    """final/: a Hugging Face folder, and final.gguf beside it when `gguf` names a dtype.
    A sharded model is gathered first (every rank joins). With `lora` (a run that trained
    adapters) they are merged in, and written as a peft adapter for `base` first when
    `lora.save_adapter` asks (final-adapter/)."""
    if fsdp:
        state = full_model_state(model)
        if not accelerator.is_main_process:
            return
        model = CustomLLM(model.config)
        if lora is not None:
            model = add_adapters(model, lora)
        model.load_state_dict(state)
    elif not accelerator.is_main_process:
        return
    if lora is not None:
        if lora.save_adapter:
            with staged_folder(out / ADAPTER) as tmp:
                save_adapter(model, lora, tmp, base)
        model = merge_adapters(model)  # final/ (and the GGUF) is the plain model, adapters merged
    with staged_folder(out / "final") as tmp:  # a kill mid-export leaves no half a folder
        save_model(model, tmp, tokenizer=tokenizer)
    if gguf:
        from smoltrain.formats.gguf import write_gguf

        write_gguf(model, out / "final.gguf", tokenizer, gguf, name=out.name)


# every file and folder a run writes into its output folder: what --overwrite removes
RUN_FILES = ("metrics.jsonl", CHECKPOINTS, "final", "final-adapter", "final.gguf", "loss.png", "branches.png")


def holds_run(out: Path) -> bool:
    """Whether a folder holds a run: one with a completed step (logged, checkpointed or
    exported). A start that failed before its first step leaves no run behind."""
    metrics = out / "metrics.jsonl"
    logged = metrics.is_file() and '"loss"' in metrics.read_text(errors="replace")
    checkpointed = any((p / COMPLETE).is_file() for p in (out / CHECKPOINTS).glob("step-*"))
    return logged or checkpointed or (out / "final").is_dir()


def prepare_output_dir(cfg: TrainConfig, phase: str, overwrite: bool) -> Path:
    """The output folder, refused at init if it holds a run and `overwrite` is off. Nothing
    is removed here: `clear_old_run` does that once everything has been checked."""
    out = Path(cfg.output_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise TrainingError(
            f"output folder '{out}' cannot be made: '{blocking}' is a file; pass another --output-dir "
            "(or output_dir in the config)"
        )
    if phase != "resume" and holds_run(out) and not overwrite:
        resume = f"--phase resume --checkpoint {out} to continue it, " if (out / CHECKPOINTS).is_dir() else ""
        raise TrainingError(
            f"output folder '{out}' already holds a run; pass --overwrite to replace it, "
            f"{resume}or another --output-dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def clear_old_run(out: Path) -> None:
    """Remove what an earlier run (or a failed start) left in `out`: called by rank 0 at init
    when the model, data and tokenizer are built, so a typo never costs the old run."""
    for name in RUN_FILES:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
