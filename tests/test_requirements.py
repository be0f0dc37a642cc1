"""pyproject's torch floor against what the code uses: each feature with the release that
brought it, and the feature present in the torch installed here."""

import re
from pathlib import Path

import torch
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]

# feature -> (the first torch release with it, how to find it in an installed torch)
TORCH_FEATURES = {
    "FSDP2 fully_shard (train.fsdp)": (
        "2.6",
        lambda: __import__("torch.distributed.fsdp").distributed.fsdp.fully_shard,
    ),
    "FlexAttention (document masks on CUDA)": (
        "2.5",
        lambda: __import__("torch.nn.attention.flex_attention"),
    ),
    "torch.optim.Muon (optim.name: muon)": ("2.9", lambda: torch.optim.Muon),
    "SDPA enable_gqa (grouped-query attention)": (
        "2.5",
        lambda: torch.nn.functional.scaled_dot_product_attention,
    ),
    "torch.amp.GradScaler('cpu') (fp16 tested on CPU)": ("2.3", lambda: torch.amp.GradScaler("cpu")),
}


def torch_floor() -> Version:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"torch>=([\d.]+)', text)
    assert match, "pyproject.toml names no torch floor"
    return Version(match.group(1))


def test_the_torch_floor_covers_every_feature_used():
    floor = torch_floor()
    for feature, (first, find) in TORCH_FEATURES.items():
        assert floor >= Version(first), f"{feature} needs torch {first}; pyproject allows {floor}"
        assert find() is not None, feature
    assert Version(torch.__version__.split("+")[0]) >= floor
    assert floor == max(Version(first) for first, _ in TORCH_FEATURES.values())  # no higher than needed


def test_the_spaces_requirements_pin_torch_as_pyproject_does():
    pyproject = (REPO / "pyproject.toml").read_text()
    pin = re.search(r'"(torch>=[\d.]+,<[\d.]+)"', pyproject).group(1)
    assert pin in (REPO / "requirements.txt").read_text().splitlines()
