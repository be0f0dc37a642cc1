import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from smoltrain.formats.hf import from_hf_key, to_hf_key
from smoltrain.formats.model_io import load_model, save_model
from smoltrain.model import CustomLLM
from smoltrain.model.config import get_preset
from smoltrain.tokenizer import load_tokenizer
from tests.conftest import micro_config


def test_key_map_round_trips(micro_model):
    for key in micro_model.state_dict():
        assert from_hf_key(to_hf_key(key)) == key
    assert to_hf_key("layers.3.input_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert to_hf_key("layers.0.post_attn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"


def test_save_then_transformers_loads_same_logits(tmp_path, tiny_model, smollm2_tokenizer):
    save_model(tiny_model, tmp_path, tokenizer=smollm2_tokenizer)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(hf, LlamaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (tmp_path / "tokenizer.json").is_file()
    ids = torch.randint(0, 49152, (2, 20))
    with torch.no_grad():
        assert (tiny_model(ids).logits - hf.eval()(ids).logits).abs().max() < 1e-5


def test_transformers_save_then_we_load(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(micro_config().to_hf()).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.lm_head.weight is ours.embed_tokens.weight  # still tied after loading
    assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-5


def test_untied_and_sharded_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = CustomLLM(micro_config(tie_word_embeddings=False)).eval()
    save_model(model, tmp_path)
    # split the weights into two shards with an index, as large hub checkpoints are
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": keys[:5],
        "model-00002-of-00002.safetensors": keys[5:],
    }
    weight_map = {}
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, tmp_path / name)
        weight_map.update(dict.fromkeys(names, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is not loaded.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_gguf_loads_as_transformers_does(smollm2):
    ours, theirs = smollm2
    assert ours.config.rope_theta == 100000.0 and ours.config.eos_token_id == 2
    assert ours.num_parameters() == 134_515_008
    hf_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, hf_state[to_hf_key(key)]), key


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="folder without config.json"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")


def test_shape_mismatch_is_a_clear_error(tmp_path):
    save_model(CustomLLM(micro_config()), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"shape mismatches .*mlp.gate_proj.weight: checkpoint \(128, 64\) vs model \(96, 64\)",
    ):
        load_model(tmp_path)


def test_missing_tensor_is_a_clear_error(tmp_path):
    save_model(CustomLLM(micro_config()), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: \['model.norm.weight'\]"):
        load_model(tmp_path)


def test_convert_cli_gguf_to_hf_folder(tmp_path):
    from smoltrain.cli import main

    main(["convert", "smollm2", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.rope_parameters["rope_theta"] == 100000.0
    assert sum(p.numel() for p in hf.parameters()) == 134_515_008


def test_preset_round_trip_keeps_dtype(tmp_path):
    model = CustomLLM(get_preset("tiny", num_hidden_layers=1)).to(torch.bfloat16)
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_a_saved_folder_loads_without_init_or_transformers_scan(tmp_path, tiny_model, smollm2_tokenizer):
    """`generate`, `chat`, `eval` and the app start by loading a model and its tokenizer: the model
    is built on the meta device without a random init (meta's `normal_` and `arange` import torch's
    compiler, 1 s) and takes copies of the loaded tensors as its parameters (`to_empty` on meta
    imports torch's symbolic shapes, 0.2 s), which later writes to the file cannot reach; a
    tokenizer of transformers' generic class is loaded by that class, not by `AutoTokenizer`
    (which reads the module list of every model transformers has, 1 s)."""
    save_model(tiny_model, tmp_path, tokenizer=smollm2_tokenizer)
    script = (
        "import sys\n"
        "import transformers\n"
        "def refuse(*args, **kwargs):\n"
        "    raise AssertionError('AutoTokenizer was used')\n"
        "transformers.AutoTokenizer.from_pretrained = refuse\n"
        "from smoltrain.formats.model_io import load_model\n"
        "from smoltrain.tokenizer import load_tokenizer\n"
        f"model, tokenizer = load_model({str(tmp_path)!r}), load_tokenizer({str(tmp_path)!r})\n"
        "ids = tokenizer('Hello world')['input_ids']\n"
        "print(type(tokenizer).__name__, ids, 'torch._dynamo' in sys.modules,\n"
        "      'torch.fx.experimental.symbolic_shapes' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = smollm2_tokenizer("Hello world")["input_ids"]
    assert result.stdout.split("\n")[-2] == f"TokenizersBackend {ids} False False"
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    params = list(loaded.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 and p.requires_grad for p in params)
    weights = tmp_path / "model.safetensors"  # written over in place by another process: not seen
    with weights.open("r+b") as f:
        f.seek(weights.stat().st_size // 2)
        f.write(bytes(weights.stat().st_size // 2))
    assert torch.equal(loaded.rotary_emb.cos_cached, tiny_model.rotary_emb.cos_cached)
    tokens = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, tiny_model(tokens).logits)

    # a tokenizer of another class is still AutoTokenizer's to pick
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    assert type(load_tokenizer(tmp_path)).__name__ == "GPT2Tokenizer"
