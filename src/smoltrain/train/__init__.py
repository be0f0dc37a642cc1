"""Training on `accelerate.Accelerator`, in pieces that read in one screen (loop.py):

    run = setup_run(cfg, ...)           # everything built; the caller's config untouched
    while not done:
        result = train_step(run)        # accumulation, clipping, the non-finite policy
        run_periodic_jobs(run, result)  # log, evaluate, sample, checkpoint
    finish(run)                         # export final/, plot, summary

    config.py      the config's sections, loading, checks
    overrides.py   what a command line means: flags, resuming, cooldown branches
    optim.py       optimizers and learning-rate schedules
    parallel.py    DDP/FSDP2 wrapping, gathering state, collectives
    machine.py     what this machine can do: `smoltrain env`, memory estimates
    setup.py       `setup_run`: the accelerator, model, optimizers, data, resume -> `Run`
    step.py        `train_step` and the loss-spike guard
    jobs.py        what runs between steps when due; `finish`
    checkpoint.py  checkpoints: written, found, checked, restored
    metrics.py     metrics.jsonl, trackers, plots
    output.py      the output folder and the files a run writes
    loop.py        `train()`

An output folder holds `metrics.jsonl`, `checkpoints/step-N/` + `checkpoints/latest`,
`final/` (a Hugging Face folder) and `loss.png`.
"""
