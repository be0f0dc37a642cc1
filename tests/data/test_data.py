import json
import logging

import pytest
import torch
from transformers import DataCollatorForLanguageModeling

from smoltrain.data import sources as data_mod
from smoltrain.data.config import DataConfig
from smoltrain.data.loader import build_loader
from smoltrain.data.sources import is_eval_document, open_source
from smoltrain.data.stream import TokenStream
from smoltrain.model import CustomLLM
from tests.conftest import micro_config

NEVER = 10**12  # eval_every so large that no document is held out


def write_jsonl(path, texts, **extra_columns):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t, **extra_columns}) + "\n")
    return path


def make_docs(n, seed=0):
    import random

    rng = random.Random(seed)
    words = "the cat sat on a mat while python code runs fast and slow in many small loops".split()
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 90))) for i in range(n)]


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "docs.jsonl", make_docs(60))


def one_pass(cfg, tokenizer, rank=0, world_size=1, split="train"):
    open_fn = lambda: open_source(cfg.source, cfg.text_column)  # noqa: E731
    return list(TokenStream(open_fn, tokenizer, cfg, split, rank, world_size, infinite=False))


def test_packing_keeps_every_token_once(corpus, smollm2_tokenizer):
    cfg = DataConfig(source=str(corpus), context_length=64, shuffle_buffer=0, holdout_every=NEVER)
    blocks = one_pass(cfg, smollm2_tokenizer)
    assert all(b["input_ids"].shape == (64,) for b in blocks)
    docs = [json.loads(line)["text"] for line in open(corpus)]
    expected = []
    for d in docs:
        expected += smollm2_tokenizer(d, add_special_tokens=False)["input_ids"] + [
            smollm2_tokenizer.eos_token_id
        ]
    got = torch.cat([b["input_ids"][b["labels"] != -100] for b in blocks]).tolist()
    assert got == expected
    assert all((b["labels"] != -100).all() for b in blocks[:-1])  # only the last block is padded
    # position ids restart right after every EOS and at each block start
    eos = smollm2_tokenizer.eos_token_id
    for b in blocks:
        ids, pos = b["input_ids"].tolist(), b["position_ids"].tolist()
        assert pos[0] == 0
        for t in range(1, int((b["labels"] != -100).sum())):
            assert pos[t] == (0 if ids[t - 1] == eos else pos[t - 1] + 1)


def test_document_mask_isolates_documents(corpus, smollm2_tokenizer):
    """The batch carries (B, T) document ids, not a (B, 1, T, T) mask built on the host; the
    model's mask from them gives every packed document the logits it gives alone."""
    from smoltrain.model import build_attention_mask

    cfg = DataConfig(
        source=str(corpus), context_length=96, shuffle_buffer=0, holdout_every=NEVER, document_mask=True
    )
    loader = build_loader(cfg, smollm2_tokenizer, batch_size=2)
    batch = next(iter(loader))
    assert "attention_mask" not in batch and batch["document_ids"].shape == (2, 96)
    torch.manual_seed(0)
    model = CustomLLM(micro_config(vocab_size=49152)).eval()
    with torch.no_grad():
        packed = model(
            batch["input_ids"], document_ids=batch["document_ids"], position_ids=batch["position_ids"]
        ).logits
    # every document inside the first row gives the logits it gives alone
    ids, pos = batch["input_ids"][0], batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [96]
    assert len(starts) > 2
    mask = build_attention_mask(None, 0, 96, None, torch.device("cpu"), batch["document_ids"])
    for a, b in zip(starts, starts[1:], strict=False):
        with torch.no_grad():
            alone = model(ids[a:b][None]).logits[0]
        assert torch.allclose(packed[0, a:b], alone, atol=1e-5)
        # and no query attends outside its document
        assert not mask[0, 0, a:b, :a].any() and not mask[0, 0, a:b, b:].any()


def test_pad_mode_reproduces_data_collator(corpus, smollm2_tokenizer):
    cfg = DataConfig(source=str(corpus), context_length=32, mode="pad", shuffle_buffer=0, holdout_every=NEVER)
    loader = build_loader(cfg, smollm2_tokenizer, batch_size=4)
    batch = next(iter(loader))
    docs = [json.loads(line)["text"] for line in open(corpus)]
    rows = []
    for d in docs:
        ids = smollm2_tokenizer(d, add_special_tokens=False)["input_ids"] + [smollm2_tokenizer.eos_token_id]
        rows += [ids[i : i + 32] for i in range(0, len(ids), 32)]  # long documents are split
    collator = DataCollatorForLanguageModeling(smollm2_tokenizer, mlm=False)
    expected = collator([{"input_ids": r} for r in rows[:4]])
    # the same rows, padded on the right; no mask: causal attention never looks right
    assert set(batch) == set(expected) - {"attention_mask"}
    for key in batch:
        assert torch.equal(batch[key], expected[key]), key
    torch.manual_seed(0)
    model = CustomLLM(micro_config(vocab_size=49152)).eval()
    with torch.no_grad():
        masked = model(
            expected["input_ids"], attention_mask=expected["attention_mask"], labels=batch["labels"]
        )
        plain = model(batch["input_ids"], labels=batch["labels"])
    real = expected["attention_mask"].bool()
    assert torch.allclose(masked.logits[real], plain.logits[real], atol=1e-5)
    assert torch.allclose(masked.loss, plain.loss, atol=1e-6)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_resume_is_exact(tmp_path, smollm2_tokenizer, workers, mode):
    # 4 shards, so 2 workers each read their own; small enough to cross epochs
    for s in range(4):
        write_jsonl(tmp_path / f"part-{s}.jsonl", make_docs(12, seed=s))
    cfg = DataConfig(
        source=str(tmp_path / "*.jsonl"),
        context_length=48,
        mode=mode,
        shuffle_buffer=6,
        holdout_every=NEVER,
        num_workers=workers,
        tokenize_batch=4,
    )
    reference = take(iter(build_loader(cfg, smollm2_tokenizer, batch_size=3)), 40)
    for k in (1, 9, 23):
        loader = build_loader(cfg, smollm2_tokenizer, batch_size=3)
        it = iter(loader)
        take(it, k)
        state = loader.state_dict()
        del it
        restored = build_loader(cfg, smollm2_tokenizer, batch_size=3)
        restored.load_state_dict(state)
        after = take(iter(restored), 6)
        for got, want in zip(after, reference[k : k + 6], strict=True):
            for key in want:
                assert torch.equal(got[key], want[key]), (k, key)


def test_ranks_split_documents_without_overlap(corpus, smollm2_tokenizer):
    cfg = DataConfig(
        source=str(corpus), context_length=512, mode="pad", shuffle_buffer=0, holdout_every=NEVER
    )
    decoded = []
    for rank in range(2):
        rows = one_pass(cfg, smollm2_tokenizer, rank=rank, world_size=2)
        decoded.append({smollm2_tokenizer.decode(r["input_ids"][:-1]) for r in rows})
    docs = {json.loads(line)["text"] for line in open(corpus)}
    assert not decoded[0] & decoded[1]
    assert decoded[0] | decoded[1] == docs
    assert decoded[0] and decoded[1]


def test_resume_when_sharded_across_ranks(tmp_path, smollm2_tokenizer):
    for s in range(2):
        write_jsonl(tmp_path / f"part-{s}.jsonl", make_docs(20, seed=s))
    cfg = DataConfig(
        source=str(tmp_path), context_length=40, shuffle_buffer=5, holdout_every=NEVER, rank_split="document"
    )
    for rank in range(2):
        reference = take(iter(build_loader(cfg, smollm2_tokenizer, 2, rank=rank, world_size=2)), 12)
        loader = build_loader(cfg, smollm2_tokenizer, 2, rank=rank, world_size=2)
        it = iter(loader)
        take(it, 5)
        restored = build_loader(cfg, smollm2_tokenizer, 2, rank=rank, world_size=2)
        restored.load_state_dict(loader.state_dict())
        for got, want in zip(take(iter(restored), 7), reference[5:], strict=True):
            assert torch.equal(got["input_ids"], want["input_ids"])


def test_eval_split_is_disjoint_from_train(tmp_path, smollm2_tokenizer):
    docs = make_docs(300)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = DataConfig(source=str(path), context_length=512, mode="pad", shuffle_buffer=0, holdout_every=10)
    train = {smollm2_tokenizer.decode(r["input_ids"][:-1]) for r in one_pass(cfg, smollm2_tokenizer)}
    held = {
        smollm2_tokenizer.decode(r["input_ids"][:-1]) for r in one_pass(cfg, smollm2_tokenizer, split="eval")
    }
    assert held and not train & held
    assert train | held == set(docs)
    assert held == {d for d in docs if is_eval_document(d, 10)}
    assert 10 <= len(held) <= 55  # about 1 in 10


def test_hub_source_streams_cosmopedia_layout(tmp_path, monkeypatch, smollm2_tokenizer):
    import pandas as pd

    texts = make_docs(30)
    frame = pd.DataFrame(
        {
            "prompt": ["Write a textbook section"] * 30,
            "text": texts,
            "token_length": [len(t.split()) for t in texts],
            "audience": ["college_students"] * 30,
            "format": ["textbook"] * 30,
            "seed_data": ["web_samples_v2"] * 30,
        }
    )
    parquet = tmp_path / "train-00000-of-00001.parquet"
    frame.to_parquet(parquet)
    calls = []
    real = data_mod.load_dataset

    def hub_standin(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        if path == "HuggingFaceTB/smollm-corpus":  # the hub, served from the local file
            return real("parquet", data_files=[str(parquet)], **kwargs)
        return real(path, name, **kwargs)

    monkeypatch.setattr(data_mod, "load_dataset", hub_standin)
    cfg = DataConfig(
        source="hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2",
        context_length=512,
        mode="pad",
        shuffle_buffer=0,
        holdout_every=NEVER,
    )
    rows = one_pass(cfg, smollm2_tokenizer)
    assert calls[0] == ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", {"split": "train", "streaming": True})
    assert [smollm2_tokenizer.decode(r["input_ids"][:-1]) for r in rows] == texts


def test_builtin_python_docs_corpus():
    ds = open_source("builtin:python-docs")
    docs = [row["text"] for row in ds]
    assert len(docs) > 500
    assert 0.8e6 < sum(len(d) for d in docs) < 3e6  # about 1 MB of English prose
    assert any(d.startswith("Module json") for d in docs)
    assert docs == [row["text"] for row in open_source("builtin:python-docs")]


def test_txt_sources_and_undecodable_files(tmp_path, smollm2_tokenizer, caplog):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe bytes")
    (tmp_path / "c.txt").write_text("Third file.")
    per_file = [r["text"] for r in open_source(str(tmp_path / "*.txt"))]
    with caplog.at_level(logging.WARNING):
        per_par = [r["text"] for r in open_source(str(tmp_path), txt_documents="paragraph")]
    assert per_file == ["First paragraph.\n\nSecond paragraph.", "Third file."]
    assert per_par == ["First paragraph.", "Second paragraph.", "Third file."]
    assert "b.txt: not UTF-8" in caplog.text and "1 file(s) skipped" in caplog.text


def test_bad_sources_are_clear_errors(tmp_path, smollm2_tokenizer):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        open_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        open_source(str(tmp_path / "empty.jsonl"))
    path = write_jsonl(tmp_path / "d.jsonl", ["x"], body="y")
    with pytest.raises(ValueError, match=r"no column 'content'; its columns are \['text', 'body'\]"):
        open_source(str(path), text_column="content")
    assert [r["text"] for r in open_source(str(path), text_column="body")] == ["y"]
    only_eval = write_jsonl(tmp_path / "e.jsonl", ["one"])
    cfg = DataConfig(source=str(only_eval), holdout_every=NEVER)
    with pytest.raises(ValueError, match="yielded no eval documents"):
        next(iter(build_loader(cfg, smollm2_tokenizer, 1, split="eval")))
    with pytest.raises(ValueError, match="data.mode must be"):
        DataConfig(mode="stream")


def test_long_documents_are_split_not_dropped(tmp_path, smollm2_tokenizer):
    long_doc = " ".join(f"word{i}" for i in range(400))
    path = write_jsonl(tmp_path / "long.jsonl", [long_doc])
    cfg = DataConfig(source=str(path), context_length=50, mode="pad", shuffle_buffer=0, holdout_every=NEVER)
    rows = one_pass(cfg, smollm2_tokenizer)
    ids = smollm2_tokenizer(long_doc, add_special_tokens=False)["input_ids"] + [
        smollm2_tokenizer.eos_token_id
    ]
    assert len(rows) == -(-len(ids) // 50)
    assert sum((r["input_ids"] for r in rows), []) == ids


def test_micro_batch_split_is_the_one_rank_stream_dealt_out(corpus, smollm2_tokenizer):
    cfg = DataConfig(source=str(corpus), context_length=32, shuffle_buffer=4, holdout_every=NEVER)
    single = take(iter(build_loader(cfg, smollm2_tokenizer, 2)), 8)
    ranks = [take(iter(build_loader(cfg, smollm2_tokenizer, 2, rank=r, world_size=2)), 4) for r in range(2)]
    for i, batch in enumerate(single):
        assert torch.equal(batch["input_ids"], ranks[i % 2][i // 2]["input_ids"])
    # the saved position is global: a 2-rank state resumes a 1-rank loader at the same place
    loader = build_loader(cfg, smollm2_tokenizer, 2, rank=1, world_size=2)
    it = iter(loader)
    take(it, 3)
    one = build_loader(cfg, smollm2_tokenizer, 2)
    one.load_state_dict(loader.state_dict())
    assert torch.equal(next(iter(one))["input_ids"], single[6]["input_ids"])


def test_workers_send_their_state_once_per_snapshot_and_resume_exactly_between(
    tmp_path, smollm2_tokenizer, monkeypatch
):
    """A worker's state (the shuffle buffer in it) was pickled to the main process with every
    batch; now every `snapshot_every` batches (the checkpoint interval). A state taken between
    two snapshots still resumes exactly (the loader replays the batches since the last)."""
    from smoltrain.data import stream as data

    for s in range(2):
        write_jsonl(tmp_path / f"part-{s}.jsonl", make_docs(40, seed=s))
    cfg = DataConfig(
        source=str(tmp_path / "*.jsonl"),
        context_length=48,
        shuffle_buffer=6,
        holdout_every=NEVER,
        num_workers=2,
    )
    calls = tmp_path / "state-calls"
    real_state_dict = data.TokenStream.state_dict

    def counted(self):
        with open(calls, "a") as f:  # appended to from the (forked) worker processes
            f.write("x")
        return real_state_dict(self)

    monkeypatch.setattr(data.TokenStream, "state_dict", counted)
    sent = {}
    for every in (1, 100):
        calls.unlink(missing_ok=True)
        take(iter(build_loader(cfg, smollm2_tokenizer, batch_size=2, snapshot_every=every)), 20)
        sent[every] = len(calls.read_text())
    assert sent[1] >= 20 and sent[100] <= 4, sent  # 100: the workers' initial states only
    reference = take(iter(build_loader(cfg, smollm2_tokenizer, batch_size=2)), 30)
    loader = build_loader(cfg, smollm2_tokenizer, batch_size=2, snapshot_every=10)
    it = iter(loader)
    take(it, 13)
    state = loader.state_dict()
    del it
    restored = build_loader(cfg, smollm2_tokenizer, batch_size=2, snapshot_every=10)
    restored.load_state_dict(state)
    for got, want in zip(take(iter(restored), 6), reference[13:19], strict=True):
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_rank_split_auto_is_per_device():
    from smoltrain.data.stream import resolve_rank_split

    assert resolve_rank_split("auto", "cuda", 8) == "document"  # every rank tokenizing all: too slow
    assert resolve_rank_split("auto", "cuda", 1) == "micro_batch"
    assert resolve_rank_split("auto", "cpu", 2) == "micro_batch"  # the same run for any count
    assert resolve_rank_split("micro_batch", "cuda", 8) == "micro_batch"


@pytest.mark.parametrize("files", [8, 1])
def test_dataloader_workers_and_ranks_read_every_document_exactly_once(tmp_path, smollm2_tokenizer, files):
    """One epoch through DataLoader workers covers every training document once, by content.
    datasets split a stream among the workers a second time, inside each worker: 2 workers
    read half the documents, 4 a quarter, and with one file the other workers nothing."""
    from collections import Counter

    from torchdata.stateful_dataloader import StatefulDataLoader

    docs = make_docs(200)
    for f in range(files):
        write_jsonl(tmp_path / f"part-{f}.jsonl", docs[f::files])
    cfg = DataConfig(
        source=str(tmp_path / "*.jsonl"),
        context_length=512,
        mode="pad",
        shuffle_buffer=0,
        holdout_every=NEVER,
    )
    open_fn = lambda: open_source(cfg.source, cfg.text_column)  # noqa: E731
    for world, workers in ((1, 0), (1, 2), (1, 4), (2, 2)):
        seen = Counter()
        for rank in range(world):
            stream = TokenStream(open_fn, smollm2_tokenizer, cfg, "train", rank, world, infinite=False)
            for row in StatefulDataLoader(stream, batch_size=None, num_workers=workers):
                seen[smollm2_tokenizer.decode(row["input_ids"][:-1])] += 1
        assert seen == Counter(docs), (world, workers, len(seen), sum(seen.values()))


def test_pad_mode_leaves_the_runs_tokenizer_as_it_was(corpus, smollm2_tokenizer):
    """make_collate set the shared tokenizer's pad token and side, which checkpoints then saved."""
    import copy

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.pad_token, tokenizer.padding_side = None, "left"
    cfg = DataConfig(source=str(corpus), context_length=32, mode="pad", shuffle_buffer=0, holdout_every=NEVER)
    batch = next(iter(build_loader(cfg, tokenizer, batch_size=4)))
    assert batch["input_ids"].shape[0] == 4
    assert tokenizer.pad_token is None and tokenizer.padding_side == "left"
