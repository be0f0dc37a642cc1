"""How good a model is: held-out loss and samples during training (holdout.py), lm-eval
benchmarks (benchmarks.py)."""
