"""Training configuration: typed dataclasses, one per concern, read from YAML with dotted
overrides through OmegaConf (which refuses unknown keys and names the nearest valid one)."""

from __future__ import annotations

import copy
import difflib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from smoltrain.data.config import DataConfig
from smoltrain.model.config import ModelConfig, get_preset
from smoltrain.model.kernels import choose_kernels
from smoltrain.train.metrics import flatten


@dataclass
class ModelSection:
    preset: str = "tiny"  # a name from smoltrain.model.config.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to change
    init_from: str | None = None  # start from these weights: a folder, hub name, .gguf or smollm2

    def build_config(self) -> ModelConfig:
        return get_preset(self.preset, **self.overrides)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon for the hidden layers' matrices, AdamW for the rest)
    lr: float = 2e-4  # peak learning rate (AdamW's)
    muon_lr: float = 0.02  # muon: Muon's peak learning rate (same schedule)
    muon_momentum: float = 0.95  # muon: Muon's momentum (Nesterov)
    weight_decay: float = 0.01  # decoupled weight decay (AdamW's), on matrices only by default
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.999  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's denominator term
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    decay_norms_and_embeddings: bool = False  # apply weight decay to 1-D weights and embeddings too
    fused: bool | None = None  # fused AdamW kernel; None: on CUDA and CPU


@dataclass
class ScheduleConfig:
    kind: str = "linear"  # linear | cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 500  # linear warmup from 0 to lr
    max_steps: int = 5000  # optimizer steps in the schedule; the run ends here
    # fit the run to this wall time: after its first steps, max_steps becomes the most steps
    # that fit, evals included (max_steps stays the cap); the demo's legs use it
    max_minutes: float | None = None
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: share of the steps spent in the final decay
    decay_start: int | None = None  # wsd: the step after which the decay begins (a cooldown branch's)
    past_end_lr: float = 0.0  # lr for steps beyond max_steps (the resume phase's extra steps)


# the linear layers of a decoder layer, by their names in our model and in transformers'
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """Low-rank adapters through peft (smoltrain/train/lora.py): the model's own weights stay frozen."""

    rank: int = 0  # 0: off (every weight trains); else the adapters' rank (8-64 is usual)
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input
    targets: list[str] = field(default_factory=lambda: list(LINEARS))  # the linear layers that get adapters
    save_adapter: bool = False  # also write final-adapter/, a peft adapter folder (final/ is merged)


@dataclass
class TrainLoopConfig:
    micro_batch_size: int = 4  # sequences per forward pass per process
    grad_accum_steps: int = 8  # micro-batches per optimizer step
    global_batch_size: int | None = None  # if set, grad_accum_steps = global / (micro * processes)
    # auto | fp32 | bf16 | fp16; auto: bf16 on CUDA (fp16 without bf16), fp32 on MPS, and on
    # CPU bf16 only where its bf16 matmuls measure fast (smoltrain env shows the choice)
    precision: str = "auto"
    device: str = "auto"  # auto (cuda > mps > cpu) | cuda | mps | cpu
    seed: int = 42  # the weights' initialization and the monitoring sample's draws
    compile: bool = False  # torch.compile the model
    kernels: str = "auto"  # auto: those measured to pay on this device | off | a list: chunked_loss,mlp
    tune_malloc: bool = True  # CPU under glibc: keep freed memory, tcache off (docs/performance.md)
    fsdp: bool = False  # shard weights, gradients and optimizer state over processes (FSDP2)
    dist_timeout_minutes: float = 60.0  # a collective's wait, e.g. for rank 0 writing a checkpoint
    gradient_checkpointing: bool = False  # recompute each layer in backward: less memory, ~30% more time
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters instead of training every weight
    max_bad_steps: int = 5  # NaN/inf steps in a row before the run stops
    loss_scale: float = 65536.0  # fp16: GradScaler's initial scale (halved at each overflow)
    # Loss-spike guard (0: off): a step whose loss or grad norm exceeds spike_factor x its mean
    # over the last spike_window good steps is skipped; spike_rollback such skips within
    # spike_window steps roll the run back to its last checkpoint, the data moving on.
    spike_factor: float = 0.0  # a spike: loss or grad norm above this x the recent mean (0: guard off)
    spike_window: int = 50  # good steps the mean is taken over
    spike_rollback: int = 3  # skipped spikes within spike_window steps that roll back to a checkpoint
    mps_empty_cache_every: int = 50  # release cached MPS memory every N steps (0: never)
    # the device's peak FLOP/s that MFU is against; None: a known GPU's datasheet, else measured
    peak_flops: float | None = None
    tf32: bool = True  # CUDA, fp32: TF32 matmuls (tensor cores, fp32 accumulation)


@dataclass
class LogConfig:
    log_every: int = 100  # optimizer steps between log lines
    eval_every: int = 500  # optimizer steps between held-out evaluations (and at the last step)
    eval_at_start: bool = False  # also evaluate (and score benchmarks.tasks) before the first step
    eval_batches: int = 20  # batches of the held-out split per evaluation
    sample_every: int = 500  # optimizer steps between monitoring samples
    sample_prompt: str = "The future of AI is"  # the monitoring sample's prompt
    sample_tokens: int = 40  # new tokens per monitoring sample
    sample_temperature: float = 0.8  # 0: greedy; sampling (seeded) reads better from small models
    sample_top_k: int = 50  # sampling: only the k likeliest tokens
    sample_quantize: str = "off"  # off | int8 | int4: samples from a quantized copy (CPU runs; faster)
    checkpoint_every: int = 500  # optimizer steps between checkpoints (and at the end or a signal)
    keep_checkpoints: int = 3  # older step-N folders are removed
    trackers: list[str] = field(default_factory=list)  # any of: wandb, tensorboard
    project: str = "smoltrain"  # tracker project name
    progress_bar: bool = True  # on a terminal only (a pipe or a log file gets the log lines)


@dataclass
class BenchmarkConfig:
    """Benchmark scores during training (the `eval` section; smoltrain.evaluation.benchmarks, lm-eval)."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task names or presets (smollm2); []: off
    every: int = 1000  # optimizer steps between runs (and at the last step)
    limit: float | None = None  # items per task (a fraction of each task below 1); None: all
    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int = 16  # lm-eval requests per forward
    include_path: str | None = None  # a folder of your own lm-eval task YAMLs
    # prompts in the model's chat template (few-shot examples as turns), as chat models are scored
    apply_chat_template: bool = False
    system_instruction: str | None = None  # with apply_chat_template: a system message before each prompt


@dataclass
class ExportConfig:
    gguf: str | None = None  # f32 | f16 | bf16 | q8_0 | q4_0 | q4_1: also write final.gguf beside final/


@dataclass
class ResumeConfig:
    extra_steps: int = 50  # steps a resume of a finished run adds (the reference's phase "resume")
    log_every: int = 10  # log interval during those steps


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: str = "smollm2"  # a load_tokenizer spec
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    log: LogConfig = field(default_factory=LogConfig)
    benchmarks: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    output_dir: str = "runs/default"  # the run's folder: metrics, checkpoints, final/

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _explain(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", "") or ""
    if key and key not in msg:  # "Value 'abc' ... could not be converted to Float": whose?
        msg = f"{key}: {msg}"
    if isinstance(e, ConfigKeyError):
        key = getattr(e, "full_key", "") or ""
        parent = OmegaConf.structured(TrainConfig)
        *path, leaf = key.split(".") if key else [""]
        try:
            # the key exists in another section (train.lr is optim.lr): that beats a near spelling
            elsewhere = [
                f"{name}.{leaf}" for name, sub in parent.items() if hasattr(sub, "keys") and leaf in sub
            ]
            node = OmegaConf.select(parent, ".".join(path)) if path else parent
            close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
            if elsewhere:
                msg = msg.split(" Did you mean")[0] + f" Did you mean '{elsewhere[0]}'?"
            elif close and "Did you mean" not in msg:
                msg += f" Did you mean '{'.'.join([*path, close[0]])}'?"
        except Exception:
            pass
    return msg


# keys renamed since: a config that still uses the old name is refused with the new one named;
# a checkpoint's saved config (written before the rename) is read with its keys renamed
RENAMED = {"data.eval_every": "data.holdout_every", "eval": "benchmarks"}


def renamed_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with its old keys moved to their new names."""
    saved = copy.deepcopy(saved)
    for old, new in RENAMED.items():
        *path, leaf = old.split(".")
        section = saved
        for key in path:  # the section that held the old key, if the saved config has it
            section = section.get(key) if isinstance(section, dict) else None
        if isinstance(section, dict) and leaf in section:
            *new_path, new_leaf = new.split(".")
            target = saved
            for key in new_path:
                target = target.setdefault(key, {})
            target[new_leaf] = section.pop(leaf)
    return saved


def refuse_old_keys(keys: list[str], where: str) -> None:
    """`keys` (dotted, as a file or the command line gives them) hold no renamed key."""
    for key in keys:
        for old, new in RENAMED.items():
            if key == old or key.startswith(old + "."):
                raise ValueError(
                    f"bad config: {where}: '{key}' was renamed '{new + key[len(old) :]}'; use the new name"
                )


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults <- `base` (e.g. a checkpoint's resolved config) <- YAML file <- dotted
    overrides like `optim.lr=3e-4`. Unknown keys and wrong types are errors."""
    try:
        cfg = OmegaConf.structured(TrainConfig)
        if base is not None:
            cfg = OmegaConf.merge(cfg, renamed_keys(base))
        if path is not None:
            if Path(path).is_dir():
                raise ValueError(
                    f"config '{path}' is a folder; pass a YAML file, such as configs/quickstart.yaml"
                )
            if not Path(path).is_file():
                raise FileNotFoundError(f"config file '{path}' does not exist; see configs/ for examples")
            from_file = _read_yaml(Path(path))
            tree = OmegaConf.to_container(from_file)
            refuse_old_keys([*flatten(tree), *tree], str(path))  # leaves, then (empty) sections
            cfg = OmegaConf.merge(cfg, from_file)
        bad = [o for o in overrides or [] if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key.sub=value, got {bad}")
        refuse_old_keys([o.split("=", 1)[0].lstrip("+~") for o in overrides or []], "the command line")
        cfg = OmegaConf.merge(cfg, _read_overrides(overrides or []))
        result = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ValueError(f"bad config: {_explain(e)}") from None
    result.model.build_config()  # unknown model overrides fail here, with the nearest key
    # YAML 1.1 reads a bare off/on (no/yes) as a boolean, which the string field holds as text
    result.train.kernels = {"False": "off", "false": "off", "True": "on", "true": "on"}.get(
        result.train.kernels, result.train.kernels
    )
    check_config(result)
    return result


def _read_overrides(overrides: list[str]):
    import yaml

    for override in overrides:
        try:
            OmegaConf.from_dotlist([override])
        except yaml.YAMLError as e:
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(
                f"bad config: override '{override}': {what}; give a plain value (quote text that "
                "starts with ! or holds a colon and a space)"
            ) from None
    return OmegaConf.from_dotlist(overrides)


def _read_yaml(path: Path):
    import yaml

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"bad config: {path}{where}: {what} (YAML syntax)") from None


# Choices and bounds checked when the config is loaded, so that a typo fails before any work
# rather than at the step that first reads the key (schedule.kind at the end of warmup).
CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("adamw", "muon"),
    "schedule.kind": ("linear", "cosine", "wsd", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cuda", "mps", "cpu"),
    "log.sample_quantize": ("off", "int8", "int4"),
}
AT_LEAST_ONE = (
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.max_bad_steps",
    "train.spike_window",
    "train.spike_rollback",
    "schedule.max_steps",
    "log.log_every",
    "log.eval_every",
    "log.eval_batches",
    "log.sample_every",
    "log.checkpoint_every",
    "resume.log_every",
    "data.tokenize_batch",
    "benchmarks.every",
    "benchmarks.batch_size",
)
POSITIVE = ("optim.lr", "optim.muon_lr", "optim.eps", "train.loss_scale", "train.dist_timeout_minutes")
AT_LEAST_ZERO = (
    "optim.weight_decay",
    "optim.grad_clip",
    "schedule.warmup_steps",
    "schedule.past_end_lr",
    "train.mps_empty_cache_every",
    "train.spike_factor",
    "data.num_workers",
    "data.shuffle_buffer",
    "log.sample_tokens",
    "resume.extra_steps",
)
FRACTIONS = (
    "optim.beta1",
    "optim.beta2",
    "optim.muon_momentum",
    "schedule.min_lr_ratio",
    "schedule.decay_fraction",
)


def _get(cfg: TrainConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_config(cfg: TrainConfig) -> None:
    """Refuse values no run can mean: unknown choices, counts below 1, rates at or below 0.
    (A count of 0 is not "off": an interval of 0 would divide by zero mid-run.)"""
    problems = []
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            problems.append(
                f"{key} '{_get(cfg, key)}' is unknown; use {', '.join(choices[:-1])} or {choices[-1]}"
            )
    problems += [f"{k} must be at least 1, got {_get(cfg, k)}" for k in AT_LEAST_ONE if _get(cfg, k) < 1]
    problems += [f"{k} must be above 0, got {_get(cfg, k)}" for k in POSITIVE if not _get(cfg, k) > 0]
    problems += [f"{k} must not be negative, got {_get(cfg, k)}" for k in AT_LEAST_ZERO if _get(cfg, k) < 0]
    problems += [
        f"{k} must be in [0, 1], got {_get(cfg, k)}" for k in FRACTIONS if not 0 <= _get(cfg, k) <= 1
    ]
    try:
        choose_kernels("cpu", "fp32", cfg.train.kernels)
    except ValueError as e:
        problems.append(str(e))
    if cfg.train.global_batch_size is not None and cfg.train.global_batch_size < 1:
        problems.append(f"train.global_batch_size must be at least 1, got {cfg.train.global_batch_size}")
    if cfg.benchmarks.limit is not None and not cfg.benchmarks.limit > 0:
        problems.append(
            f"benchmarks.limit must be above 0 (or unset for every item), got {cfg.benchmarks.limit}"
        )
    if cfg.export.gguf is not None:
        from smoltrain.formats.gguf import GGUF_DTYPES

        if cfg.export.gguf not in GGUF_DTYPES:
            problems.append(
                f"export.gguf '{cfg.export.gguf}' is unknown; use {', '.join(GGUF_DTYPES)} (or null: no GGUF)"
            )
    if cfg.schedule.max_minutes is not None and not cfg.schedule.max_minutes > 0:
        problems.append(f"schedule.max_minutes must be above 0 (or unset), got {cfg.schedule.max_minutes}")
    if cfg.train.peak_flops is not None and not cfg.train.peak_flops > 0:
        problems.append(f"train.peak_flops must be above 0 (or unset), got {cfg.train.peak_flops}")
    lora = cfg.train.lora
    if lora.rank < 0 or (lora.rank and not lora.alpha > 0) or not 0 <= lora.dropout < 1:
        problems.append(
            f"train.lora needs rank >= 0 (0: off), alpha above 0 and dropout in [0, 1); got rank "
            f"{lora.rank}, alpha {lora.alpha}, dropout {lora.dropout}"
        )
    if lora.rank and cfg.optim.name == "muon":
        problems.append("train.lora trains with AdamW; set optim.name=adamw")
    if problems:
        raise ValueError("bad config: " + "; ".join(problems))


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Values that are legal but surely unintended: said at start-up, the run goes on."""
    s, warnings = cfg.schedule, []
    if s.warmup_steps >= s.max_steps:
        warnings.append(
            f"schedule.warmup_steps {s.warmup_steps} >= schedule.max_steps {s.max_steps}: the "
            "learning rate never reaches optim.lr"
        )
    stages = cfg.data.stages
    for i in range(1, len(stages)):
        if stages[i - 1].until_step >= s.max_steps:
            warnings.append(
                f"data.stages[{i}] starts after step {stages[i - 1].until_step}, at or past "
                f"schedule.max_steps {s.max_steps}: it never runs"
            )
            break
    return warnings
