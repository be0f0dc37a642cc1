"""Weighted mixtures and stages: the plan, the loader, and resume through the CLI."""

import random
from pathlib import Path

import numpy as np
import pytest

from smoltrain.data.config import DataConfig, MixtureEntry, Stage
from smoltrain.data.loader import build_loader
from smoltrain.data.mixture import PERIOD, Interleave, SamplePlan
from smoltrain.data.shards import PrepareJob, prepare
from tests.data.test_data import write_jsonl
from tests.train.test_train import losses, metric_rows, small_run_args, smoltrain


def test_interleave_shares_track_the_weights():
    weights = [0.6, 0.3, 0.1]
    mix = Interleave(weights)
    picks = np.array([mix.source(i) for i in range(3 * PERIOD + 123)])
    for n in (100, 1000, 10_000, len(picks)):
        shares = np.bincount(picks[:n], minlength=3) / n
        assert np.abs(shares - weights).max() < (0.01 if n >= 1000 else 0.02), (n, shares)
        assert (mix.served(n) == np.bincount(picks[:n], minlength=3)).all()  # counted, not replayed
    assert (mix.served(PERIOD) == [6000, 3000, 1000]).all()  # exact at each period's end
    counts = np.cumsum(np.eye(3)[picks], axis=0)
    windows = (counts[1000:] - counts[:-1000]) / 1000  # every 1,000 consecutive sequences
    assert np.abs(windows - weights).max() < 0.002
    with pytest.raises(ValueError, match="below 1/10000"):
        Interleave([1.0, 1e-6])


def test_a_source_counts_on_across_stages():
    stages = [
        (0, [MixtureEntry("a", 1), MixtureEntry("b", 1)]),
        (100, [MixtureEntry("b", 1), MixtureEntry("c", 3)]),
    ]
    plan = SamplePlan(["a", "b", "c"], stages)
    counts = [0, 0, 0]
    for g in range(400):
        source, k = plan.locate(g)
        assert k == counts[source], g  # each source's own index, continued across the switch
        counts[source] += 1
        assert (plan.served(g + 1) == counts).all()
    assert counts == [50, 50 + 75, 225]


def words_docs(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A small and a large prepared source whose texts share no word."""
    root = tmp_path_factory.mktemp("mix")
    small = write_jsonl(root / "small.jsonl", words_docs(["apple", "banana", "cherry"], 40, 0))
    large = write_jsonl(root / "large.jsonl", words_docs(["zebra", "yak", "xerus", "wolf"], 1500, 1))
    for name, docs in (("small", small), ("large", large)):
        prepare(PrepareJob(str(docs), str(root / name), eval_every=20, shard_documents=500), progress=False)
    return root


def test_mixture_loader_shares_and_separate_epochs(two_sources, smollm2_tokenizer):
    small, large = str(two_sources / "small"), str(two_sources / "large")
    mixture = [MixtureEntry(small, 0.25), MixtureEntry(large, 0.75)]
    cfg = DataConfig(source=small, context_length=8, mixture=mixture)
    small_ids, large_ids = (
        {t for f in Path(folder).glob("shard-*.train.npy") for t in np.load(f).tolist()}
        for folder in (small, large)
    )
    assert small_ids & large_ids == {smollm2_tokenizer.eos_token_id}
    loader = build_loader(cfg, smollm2_tokenizer, 100, "train")
    rows, it = [], iter(loader)
    for _ in range(100):  # 10,000 sequences
        rows += [row.tolist() for row in next(it)["input_ids"]]
    from_small = sum(set(r) <= small_ids for r in rows)
    assert abs(from_small / len(rows) - 0.25) < 0.01, from_small
    assert loader.source_tokens() == {small: 2500 * 8, large: 7500 * 8}
    small_src, large_src = loader.sources
    # the small source repeats (its own epochs), the large one is still in its first
    assert small_src._epoch == (2500 - 1) // small_src.blocks.num_blocks >= 5
    assert large_src._epoch == 0 and large_src.blocks.num_blocks > 7500


def test_resume_inside_a_mixture_is_exact(two_sources, smollm2_tokenizer, tmp_path):
    stream = write_jsonl(tmp_path / "stream.jsonl", words_docs(["river", "stone"], 300, 2))
    mixture = [MixtureEntry(str(two_sources / "large"), 2.0), MixtureEntry(str(stream), 1.0)]
    cfg = DataConfig(source=str(stream), context_length=16, mixture=mixture, shuffle_buffer=8)
    straight = iter(build_loader(cfg, smollm2_tokenizer, 3, "train"))
    expected = [next(straight) for _ in range(12)]
    first = build_loader(cfg, smollm2_tokenizer, 3, "train")
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    again = build_loader(cfg, smollm2_tokenizer, 3, "train")
    again.load_state_dict(state)
    it = iter(again)
    for want in expected[5:]:
        got = next(it)
        assert all((got[k] == want[k]).all() for k in want)


def mixture_override(*entries) -> str:
    return "[" + ", ".join(f"{{source: {s}, weight: {w}}}" for s, w in entries) + "]"


def test_stages_switch_and_resume_across_the_switch_bitwise(two_sources, tmp_path):
    stream = write_jsonl(tmp_path / "stream.jsonl", words_docs(["river", "stone", "moss"], 300, 3))
    small, large = two_sources / "small", two_sources / "large"
    stages = (
        f"data.stages=[{{until_step: 3, mixture: {mixture_override((large, 1))}}}, "
        f"{{mixture: {mixture_override((small, 1), (stream, 1))}}}]"
    )

    def args(out, *extra):
        return small_run_args(tmp_path, out, stages, "log.log_every=1", "--max-steps", "6", *extra)

    run = smoltrain(*args("straight"))
    assert "step 3: stage 2 of 2 from the next step" in run.stdout
    rows = metric_rows(tmp_path / "straight")
    assert [r["stage"] for r in rows if "stage" in r] == [1]
    tokens = [r["source_tokens"] for r in rows if "source_tokens" in r]
    assert tokens[2] == {str(large): 3 * 4 * 32, str(small): 0, str(stream): 0}  # steps 1-3
    assert tokens[5] == {str(large): 12 * 32, str(small): 6 * 32, str(stream): 6 * 32}
    straight = losses(tmp_path / "straight")
    for stop in (4,):  # past the switch (inside a mixture: test_resume_inside_a_mixture_is_exact)
        smoltrain(*args(f"stop{stop}", "--stop-at-step", str(stop)))
        smoltrain("--phase", "resume", "--checkpoint", str(tmp_path / f"stop{stop}"))
        resumed = losses(tmp_path / f"stop{stop}")
        assert all(resumed[s] == straight[s] for s in range(1, 7)), (stop, straight, resumed)
    # annealing added later: a run on the first mixture alone, resumed with the stages
    first_only = f"data.mixture={mixture_override((large, 1))}"
    smoltrain(
        *small_run_args(
            tmp_path, "anneal", first_only, "log.log_every=1", "--max-steps", "6", "--stop-at-step", "3"
        )
    )
    resume = ["--phase", "resume", "--checkpoint", str(tmp_path / "anneal"), stages]
    refused = smoltrain(*resume, check=False)
    assert refused.returncode == 1 and "set data.mixture=[]" in refused.stderr
    refused = smoltrain(*resume, "data.mixture=[]", check=False)
    assert (
        refused.returncode == 1
        and "--allow-config-changes" in refused.stderr
        and "data.stages" in refused.stderr
    )
    smoltrain(*resume, "data.mixture=[]", "--allow-config-changes")
    annealed = losses(tmp_path / "anneal")
    assert all(annealed[s] == straight[s] for s in range(1, 7)), (straight, annealed)


def test_bad_mixtures_are_clear_errors(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", words_docs(["a", "b"], 20, 0))
    one = mixture_override((corpus, 1))
    cases = [
        ("data.mixture=" + mixture_override((corpus, 0)), "must be a finite number above 0"),
        ("data.mixture=" + mixture_override((corpus, 1), (corpus, 2)), "names a source twice"),
        ("data.stages=[{mixture: []}]", "is empty"),
        (
            f"data.stages=[{{mixture: {one}}}, {{mixture: {one}}}]",
            "needs an until_step",
        ),
        ("data.mixture=" + mixture_override((tmp_path / "missing.jsonl", 1)), "matches no file"),
    ]
    for override, message in cases:
        run = smoltrain(*small_run_args(tmp_path, "bad", override), check=False)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert Stage().until_step is None


def test_smollm_corpus_config_mixes_by_token_counts():
    from smoltrain.train.config import load_config
    from tests.train.test_train import REPO

    cfg = load_config(REPO / "configs/smollm2-135m-smollm-corpus.yaml")
    gpu = load_config(REPO / "configs/smollm2-135m-cosmopedia-gpu.yaml")
    weights = {e.source.split("/")[-1]: e.weight for e in cfg.data.mixture}
    assert weights == {"fineweb-edu-dedup": 220, "cosmopedia-v2": 28, "python-edu": 4}  # billions of tokens
    assert (cfg.model, cfg.train, cfg.schedule) == (gpu.model, gpu.train, gpu.schedule)
    shares = Interleave(list(weights.values())).served(PERIOD) / PERIOD
    assert abs(shares[2] - 4 / 252) < 1e-4


def test_the_epoch_permutation_is_a_bijection_in_constant_memory():
    """Each epoch's shuffled block order is computed per index (a Feistel network with cycle
    walking) instead of stored (int64 per block: ~860 MB per rank for FineWeb-Edu at 2048):
    a permutation of range(n) for any n, fixed by seed and epoch, different across them."""
    import sys

    import numpy as np

    from smoltrain.data.mixture import SeededPermutation

    for n in (1, 2, 3, 5, 64, 1000, 4097):
        order = [SeededPermutation(n, 7, 0)[i] for i in range(n)]
        assert sorted(order) == list(range(n)), n
    big = SeededPermutation(10**9, 7, 0)  # a billion blocks
    assert sys.getsizeof(big.__dict__) < 1000 and 0 <= big[10**9 - 1] < 10**9
    first = [SeededPermutation(1000, 7, 0)[i] for i in range(1000)]
    assert first == [SeededPermutation(1000, 7, 0)[i] for i in range(1000)]  # deterministic
    assert first != [SeededPermutation(1000, 7, 1)[i] for i in range(1000)]  # another epoch
    assert first != [SeededPermutation(1000, 8, 0)[i] for i in range(1000)]  # another seed
    assert abs(np.corrcoef(np.arange(1000), first)[0, 1]) < 0.1  # shuffled, not near the identity
