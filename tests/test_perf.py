import os
import subprocess
import sys

import pytest

from smoltrain.perf import LEAN_MALLOC_TUNABLE, lean_malloc_env

SHOW_ENV = (
    "import os, sys; from smoltrain.perf import relaunch_with_lean_malloc; "
    "print('start', flush=True); relaunch_with_lean_malloc(); "
    "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])"
)


def test_lean_malloc_env_keeps_other_tunables():
    env = lean_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "1"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{LEAN_MALLOC_TUNABLE}"
    assert env["A"] == "1"
    mine = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"}
    assert lean_malloc_env(mine)["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=3"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_relaunch_reexecutes_once_with_the_tunable_and_the_same_arguments():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SMOLTRAIN_RELAUNCHED")}
    out = subprocess.run(
        [sys.executable, "-c", SHOW_ENV, "--flag", "x"], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    # the code ran twice from the start (once before the exec), the second time with the tunable
    assert out == ["start", "start", f"{LEAN_MALLOC_TUNABLE} ['--flag', 'x']"]
    # a tcache choice of the user's is left alone: no relaunch
    env["GLIBC_TUNABLES"] = "glibc.malloc.tcache_count=5"
    out = subprocess.run(
        [sys.executable, "-c", SHOW_ENV], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["start", "glibc.malloc.tcache_count=5 []"]


def test_the_relaunch_is_for_cpu_training_with_tune_malloc_on(tmp_path):
    from smoltrain.cli import _trains_on_cpu_with_tuning, build_parser

    def decide(*argv):
        args, extra = build_parser().parse_known_args(["train", *argv])
        args.overrides = [*args.overrides, *extra]
        return _trains_on_cpu_with_tuning(args)

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  device: cpu\n")
    assert decide("--config", str(config))
    assert not decide("--config", str(config), "train.tune_malloc=false")
    assert not decide("--device", "cuda")
    assert not decide("--config", str(config), "train.device=mps")
    config.write_text("train:\n  tune_malloc: false\n")
    assert not decide("--config", str(config), "--device", "cpu")


def test_cpu_training_tweaks_say_what_they_apply():
    from smoltrain.perf import cpu_training_tweaks

    assert cpu_training_tweaks("cuda", True) == cpu_training_tweaks("cpu", False)
    applied = cpu_training_tweaks("cpu", True)
    if sys.platform.startswith("linux"):
        assert "glibc keeps freed memory (mallopt, for the rest of this process)" in applied
