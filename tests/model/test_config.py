import pytest

from smoltrain.model.config import PRESETS, ModelConfig, get_preset


def test_smollm2_preset_matches_spec_table():
    c = get_preset("smollm2-135m")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (49152, 576, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert (c.intermediate_size, c.max_position_embeddings, c.rope_theta) == (1536, 2048, 10000.0)
    assert c.rms_norm_eps == 1e-5 and c.tie_word_embeddings
    assert c.num_params() == 134_515_008


def test_hf_config_round_trip():
    for name, config in PRESETS.items():
        back = ModelConfig.from_hf(config.to_hf())
        assert back == config, name


def test_sliding_window_exports_as_mistral():
    hf = get_preset("tiny", sliding_window=16).to_hf()
    assert hf.model_type == "mistral" and hf.sliding_window == 16
    assert ModelConfig.from_hf(hf).sliding_window == 16


def test_unknown_key_names_nearest():
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        get_preset("tiny", hiden_size=64)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("gpt2")


def test_inconsistent_heads_rejected():
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        ModelConfig(num_attention_heads=9, num_key_value_heads=2)
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(hidden_size=100, num_attention_heads=9)


def test_unsupported_hf_architecture_rejected():
    d = get_preset("tiny").to_hf().to_dict()
    d["model_type"] = "gpt2"
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_hf(d)
