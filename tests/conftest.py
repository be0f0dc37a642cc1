import os
import tempfile

import pytest
import torch

from smoltrain.device import ISA_SETTINGS
from smoltrain.model import CustomLLM
from smoltrain.model.config import ModelConfig, get_preset

# Kernels torch.compile cached while torch was held to another instruction set (the AVX2
# setting of docs/performance.md) crashed or computed garbage when loaded without it, and
# the reverse: one inductor cache per setting (subprocesses inherit it).
_HELD = [f"{k}-{os.environ[k]}" for k in ISA_SETTINGS if k in os.environ]
if _HELD:
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "inductor-" + "-".join(_HELD))
    )


def micro_config(**overrides) -> ModelConfig:
    """A model small enough to build and run in milliseconds."""
    values = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        initializer_range=0.1,
        eos_token_id=1,
        bos_token_id=1,
    )
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def micro_model() -> CustomLLM:
    torch.manual_seed(0)
    return CustomLLM(micro_config()).eval()


@pytest.fixture(scope="session")
def tiny_model() -> CustomLLM:
    torch.manual_seed(0)
    return CustomLLM(get_preset("tiny")).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct, ours and transformers' own GGUF loading of it."""
    from transformers import AutoModelForCausalLM

    from smoltrain.formats.model_io import bundled_gguf_path, load_model

    path = bundled_gguf_path()
    ours = load_model("smollm2")
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return ours, theirs


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from smoltrain.tokenizer import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture
def sdpa_calls():
    """(kernel, is_causal, attn_mask) of every SDPA kernel dispatched to aten while the test
    runs, forward and backward: which attention path a model takes, with which arguments."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class RecordSDPA(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "scaled_dot_product" in str(func):
                schema = func._schema.arguments
                named = {a.name: a.default_value if a.has_default_value() else None for a in schema}
                named.update(zip((a.name for a in schema), args, strict=False))
                named.update(kwargs)
                calls.append((func.overloadpacket.__name__, named.get("is_causal"), named.get("attn_mask")))
            return func(*args, **kwargs)

    with RecordSDPA():
        yield calls
