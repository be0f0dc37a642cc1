"""GGUF export: the file we write is the model we trained, as transformers reads it and as
llama.cpp itself runs it (tokens, logits, greedy text), and it reads back as what we wrote."""

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from smoltrain.cli import main
from smoltrain.formats.gguf import write_gguf
from smoltrain.formats.model_io import load_model, save_model
from smoltrain.generate import generate
from smoltrain.model import CustomLLM
from smoltrain.model.config import get_preset
from smoltrain.tokenizer import load_tokenizer
from tests.test_cli_errors import assert_clean_error, command
from tests.train.test_train import small_run_args, smoltrain

# Multilingual, whitespace- and digit-heavy, with a chat marker: where tokenizers part ways.
TEXT = (
    "Größe 1234567 naïve  café\t\ttabs   and    spaces\n\n\n日本語のテキスト 42.5% — Привет, мир! "
    "🙂 x=0x1F; 3.14159 <|im_start|>user hi<|im_end|>   trailing "
)
# max |logits - ours| / max |ours| per dtype: f32 is the same numbers; the others their rounding
# (f16: 11-bit mantissa, bf16: 8-bit, q8_0: 8-bit integers with one f16 scale per 32 values).
BOUNDS = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 2.5e-2}
LLAMA_CPP_BOUNDS = {"f32": 1e-3, "q8_0": 2.5e-2}  # llama.cpp's own kernels add their rounding
SMOLLM2_Q8_0_BOUND = 5e-2  # 30 layers of q8_0 rounding add up (measured: 0.031, llama.cpp 0.029-0.046)


@pytest.fixture(scope="module")
def model() -> CustomLLM:
    torch.manual_seed(0)
    return CustomLLM(get_preset("tiny", num_hidden_layers=2)).eval()


@pytest.fixture(scope="module")
def files(model, smollm2_tokenizer, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    for dtype in BOUNDS:
        write_gguf(model, folder / f"tiny-{dtype}.gguf", smollm2_tokenizer, dtype)
    return {dtype: folder / f"tiny-{dtype}.gguf" for dtype in BOUNDS}


def relative_error(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    return ((theirs - ours).abs().max() / ours.abs().max()).item()


def llama_cpp(path: Path, text: str, tmp_path: Path, greedy: int = 0) -> dict:
    out = tmp_path / "llama_cpp.npz"
    script = Path(__file__).parents[1] / "llama_cpp_run.py"
    run = [sys.executable, str(script), str(path), str(out), "--text", text, "--greedy", str(greedy)]
    subprocess.run(run, check=True, timeout=300)
    with np.load(out) as result:
        return {k: result[k] for k in result.files}


@pytest.mark.parametrize("dtype", list(BOUNDS))
def test_transformers_reads_our_gguf_as_our_model(model, files, smollm2_tokenizer, dtype):
    ids = torch.tensor([smollm2_tokenizer(TEXT)["input_ids"]])
    path = files[dtype]
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert type(theirs).__name__ == "LlamaForCausalLM" and theirs.config.tie_word_embeddings
    with torch.no_grad():
        error = relative_error(theirs(ids).logits, model(ids).logits)
    assert error < BOUNDS[dtype], error


def test_an_untied_head_is_written_as_output(smollm2_tokenizer, tmp_path):
    torch.manual_seed(1)
    model = CustomLLM(get_preset("tiny", num_hidden_layers=1, tie_word_embeddings=False)).eval()
    write_gguf(model, tmp_path / "untied.gguf", smollm2_tokenizer, "f32")
    assert "output.weight" in {t.name for t in gguf.GGUFReader(tmp_path / "untied.gguf").tensors}
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="untied.gguf", dtype=torch.float32)
    assert not theirs.config.tie_word_embeddings
    ids = torch.tensor([smollm2_tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, model(ids).logits) < 1e-5
    back = load_model(tmp_path / "untied.gguf")
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("dtype", list(LLAMA_CPP_BOUNDS))
def test_llama_cpp_runs_our_gguf_as_our_model(model, files, smollm2_tokenizer, dtype, tmp_path):
    """llama.cpp itself: the same ids for the text, the text back from them, the same logits."""
    result = llama_cpp(files[dtype], TEXT, tmp_path)
    ids = smollm2_tokenizer(TEXT)["input_ids"]
    assert result["ids"].tolist() == ids
    assert str(result["decoded"]) == TEXT
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    error = relative_error(torch.from_numpy(result["logits"]), ours)
    assert error < LLAMA_CPP_BOUNDS[dtype], error


def test_our_gguf_reads_back_as_the_model_we_wrote(model, files):
    back = load_model(files["f32"])
    skip = {"initializer_range"}  # how weights were drawn at init: not part of a GGUF
    assert {k: v for k, v in back.config.to_dict().items() if k not in skip} == {
        k: v for k, v in model.config.to_dict().items() if k not in skip
    }
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_tokenizer_inside_encodes_and_decodes_as_the_source(files, smollm2_tokenizer):
    """Ours (from the tokenizer.json the file carries) and transformers' rebuild from
    llama.cpp's keys both give the source's ids, and decode them back to the text."""
    source = smollm2_tokenizer(TEXT)["input_ids"]
    path = files["q8_0"]
    for tokenizer in (load_tokenizer(path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)):
        ids = tokenizer(TEXT)["input_ids"]
        assert ids == source
        assert tokenizer.decode(ids) == TEXT
    ours = load_tokenizer(path)
    assert ours.chat_template == smollm2_tokenizer.chat_template
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_the_file_says_what_llama_cpp_needs(files, model):
    fields = gguf.GGUFReader(files["q8_0"]).fields

    def value(key):
        return fields[key].contents()

    c = model.config
    assert value("general.architecture") == "llama"
    assert value("llama.context_length") == c.max_position_embeddings
    assert value("llama.attention.head_count_kv") == c.num_key_value_heads
    assert value("llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.eos_token_id") == c.eos_token_id
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(files["q8_0"]).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay f32


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_smollm2_gguf_decodes_our_16_greedy_tokens(smollm2, smollm2_tokenizer, dtype, tmp_path):
    """The real SmolLM2-135M exported: llama.cpp (and for q8_0 transformers too) continues
    prompts greedily with the 16 tokens our f32 model picks. Not every prompt survives q8_0:
    "Once upon a time, there was a little girl named" parts at token 11 in llama.cpp, which
    rounds the activations to 8 bits too, and "The capital of France is Paris. The capital of
    Germany is" at token 16 in transformers (a near-tie)."""
    ours, _ = smollm2
    path = tmp_path / f"smollm2-{dtype}.gguf"
    assert command("convert", "smollm2", str(path), "--dtype", dtype).returncode == 0
    bound = LLAMA_CPP_BOUNDS["f32"] if dtype == "f32" else SMOLLM2_Q8_0_BOUND
    if dtype == "q8_0":  # loaded once: transformers' GGUF reader takes seconds per load
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    # one prompt each (llama.cpp loads the model per prompt): prose for f32, code for q8_0
    for prompt in ["Gravity is the force that"] if dtype == "f32" else ["def fibonacci(n):"]:
        ids = torch.tensor([smollm2_tokenizer(prompt)["input_ids"]])
        expected = generate(ours, ids, max_new_tokens=16)[0, ids.shape[1] :].tolist()
        with torch.no_grad():
            logits = ours(ids).logits[0]
        result = llama_cpp(path, prompt, tmp_path, greedy=16)
        assert relative_error(torch.from_numpy(result["logits"]), logits) < bound
        assert result["greedy"].tolist() == expected
        if dtype == "q8_0":
            with torch.no_grad():
                assert relative_error(theirs(ids).logits[0], logits) < SMOLLM2_Q8_0_BOUND
                new = theirs.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :]
            assert new.tolist() == expected


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_gguf_to_hf_folder_to_gguf_keeps_the_tensors(files, dtype, tmp_path):
    folder, again = tmp_path / "hf", tmp_path / f"again-{dtype}.gguf"
    main(["convert", str(files[dtype]), str(folder)])
    main(["convert", str(folder), str(again), "--dtype", dtype])
    first, second = gguf.GGUFReader(files[dtype]), gguf.GGUFReader(again)
    layout = [[(t.name, t.tensor_type) for t in r.tensors] for r in (first, second)]
    assert layout[0] == layout[1]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(first.tensors, second.tensors, strict=True))
    keys = set(first.fields) - {"general.name"}
    assert keys == set(second.fields) - {"general.name"}
    assert all(first.fields[k].contents() == second.fields[k].contents() for k in keys)


def test_generate_and_the_app_take_our_gguf(files, smollm2_tokenizer, capsys):
    main(["generate", "--model", str(files["f16"]), "--prompt", "Hello", "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert printed.startswith("Hello") and len(printed) > len("Hello")
    from smoltrain.app import load_for_serving

    model, tokenizer = load_for_serving(str(files["f16"]))
    assert tokenizer(TEXT)["input_ids"] == smollm2_tokenizer(TEXT)["input_ids"]
    assert model.config.num_hidden_layers == 2


def test_convert_refuses_bad_requests_and_keeps_what_exists(files, tmp_path):
    result = command("convert", "smollm2", str(tmp_path / "x.gguf"), "--dtype", "q4_k")
    assert_clean_error(result, "q4_k", "q8_0")
    existing = tmp_path / "mine.gguf"
    existing.write_bytes(b"keep me")
    assert_clean_error(command("convert", str(files["f32"]), str(existing)), "exists", "--overwrite")
    assert existing.read_bytes() == b"keep me"
    assert command("convert", str(files["f32"]), str(existing), "--overwrite").returncode == 0
    assert len(gguf.GGUFReader(existing).tensors) == len(gguf.GGUFReader(files["f32"]).tensors)


def test_convert_refuses_a_model_llama_cpp_cannot_represent(tmp_path, smollm2_tokenizer):
    windowed = CustomLLM(get_preset("tiny", num_hidden_layers=1, sliding_window=16))
    save_model(windowed, tmp_path / "windowed", tokenizer=smollm2_tokenizer)
    out = tmp_path / "windowed.gguf"
    result = command("convert", str(tmp_path / "windowed"), str(out))
    assert_clean_error(result, "sliding-window", "llama.cpp")
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_convert_refuses_a_tokenizer_llama_cpp_would_read_differently(tmp_path, smollm2_tokenizer):
    from tokenizers import normalizers

    lowercasing = load_tokenizer("smollm2")
    lowercasing.backend_tokenizer.normalizer = normalizers.Lowercase()
    lowercasing.save_pretrained(tmp_path / "tok")
    out = tmp_path / "x.gguf"
    result = command("convert", "smollm2", str(out), "--tokenizer", str(tmp_path / "tok"))
    assert_clean_error(result, "normalizer", "Lowercase")
    assert not out.exists()


def test_convert_without_a_tokenizer_asks_for_one(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "bare")  # weights only
    result = command("convert", str(tmp_path / "bare"), str(tmp_path / "bare.gguf"))
    assert_clean_error(result, "no tokenizer", "--tokenizer")


def test_a_run_with_export_gguf_writes_final_gguf(tmp_path):
    smoltrain(*small_run_args(tmp_path, "run", "schedule.max_steps=2", "export.gguf=q8_0"))
    path = tmp_path / "run" / "final.gguf"
    final = load_model(tmp_path / "run" / "final")
    back = load_model(path)
    assert back.config.num_hidden_layers == final.config.num_hidden_layers == 1
    # q8_0's rounding, no more: the exported file is the trained model
    ids = torch.randint(0, final.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert relative_error(back(ids).logits, final(ids).logits) < BOUNDS["q8_0"]
    # a checkpoint converts too, named after its run and step
    main(["convert", str(tmp_path / "run" / "checkpoints" / "step-2"), str(tmp_path / "step.gguf")])
    assert gguf.GGUFReader(tmp_path / "step.gguf").fields["general.name"].contents() == "run-step-2"


def test_a_run_refuses_an_export_it_cannot_write_before_training(tmp_path):
    result = smoltrain(*small_run_args(tmp_path, "bad", "export.gguf=q4"), check=False)
    assert_clean_error(result, "export.gguf 'q4' is unknown", "q8_0")
    args = small_run_args(tmp_path, "windowed", "export.gguf=f16", "model.overrides.sliding_window=8")
    assert_clean_error(smoltrain(*args, check=False), "sliding-window")
    assert not (tmp_path / "windowed" / "metrics.jsonl").exists()
