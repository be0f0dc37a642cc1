"""Hugging Face naming: the one key map between our parameter names and transformers'
LlamaForCausalLM, used by loading, saving and checkpoints. Pure dict-to-dict conversion;
reading and writing files is `smoltrain.formats.model_io`.

Our module names follow the reference (`input_norm`, `post_attn_norm`, no `model.` prefix);
transformers' LlamaForCausalLM names them `model.layers.N.input_layernorm` and so on.
"""

from __future__ import annotations

import torch

from smoltrain.model.model import CustomLLM

# (ours, transformers') name fragments; every other name only gains or loses "model.".
_RENAMES = [
    (".input_norm.", ".input_layernorm."),
    (".post_attn_norm.", ".post_attention_layernorm."),
]


def to_hf_key(key: str) -> str:
    if key == "lm_head.weight":
        return key
    for ours, theirs in _RENAMES:
        key = key.replace(ours, theirs)
    return "model." + key


def from_hf_key(key: str) -> str:
    if key == "lm_head.weight":
        return key
    key = key.removeprefix("model.")
    for ours, theirs in _RENAMES:
        key = key.replace(theirs, ours)
    return key


def hf_state_dict(model: CustomLLM) -> dict[str, torch.Tensor]:
    tied = model.config.tie_word_embeddings
    return {
        to_hf_key(k): v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }


def load_hf_state_dict(
    model: CustomLLM, tensors: dict[str, torch.Tensor], source: str = "checkpoint", assign: bool = False
) -> None:
    """Copy HF-named tensors into `model`, checking names and shapes first. With `assign` its
    parameters are replaced by copies of the tensors, in the parameters' dtypes, instead of
    copied into: `model` may then be a meta-device skeleton."""
    own = model.state_dict()
    tied = model.config.tie_word_embeddings
    renamed: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for hf_key, tensor in tensors.items():
        key = from_hf_key(hf_key)
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue  # recomputed / shared with the embedding
        if key not in own:
            unexpected.append(hf_key)
        elif own[key].shape != tensor.shape:
            mismatched.append(f"{hf_key}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
        else:
            # a copy even where the dtype matches: safetensors' tensors map the file, which a
            # process writing it in place would change under the model (or truncate: SIGBUS)
            renamed[key] = tensor.to(own[key].dtype, copy=True) if assign else tensor
    missing = [to_hf_key(k) for k in own if k not in renamed and not (tied and k == "lm_head.weight")]
    problems = []
    if mismatched:
        problems.append("shape mismatches (does the config match the weights?): " + "; ".join(mismatched[:5]))
    if missing:
        problems.append(f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if problems:
        raise ValueError(f"cannot load {source}: " + "; ".join(problems))
    model.load_state_dict(renamed, strict=False, assign=assign)
    model.tie_weights()
