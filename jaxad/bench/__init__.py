"""Benchmarks jaxad's models on the PyTorch reference's cases: `python -m jaxad.bench`.

    python -m jaxad.bench                       # every case, the reference's full protocol
    python -m jaxad.bench --quick               # fewer repeats (same shapes), a few minutes
    python -m jaxad.bench --case=conv64 --case=mlp28/train_step,score_elbo
    python -m jaxad.bench --list                # the case ids
    python -m jaxad.bench --torch_json=peer_torch_results.json,peer_torch_gan.json
    python -m jaxad.bench --quick --case=grid   # vmapped grid of 8 members vs 8 runs
    python -m jaxad.bench --quick --case=e2e    # trainer and eval binary end to end
    python -m jaxad.bench.convs                 # single convolutions of the models' shapes

Each case does the work of the same-named case of ../shared/bench/peer_torch.py (or
peer_torch_gan.py) on a fixed batch (cases: what each one computes; grid: the grid
cases; e2e: the trainer's loop and the eval binary on generated datasets beside the
compiled step alone; both run only when named). Reported per case: compile time (first
call, compilation included), the median seconds per call (timing: the reference's
interleaved rounds of warm-up and repeats of back-to-back calls, each call waited on
with `jax.block_until_ready`), images/s, FLOPs per image from XLA's cost analysis of
the compiled function (it counts elementwise ops too, but no conv taps that fall on
padding; the reference counts every tap of matmuls and convolutions only, so its conv
counts are higher), achieved GFLOP/s and its fraction of the peak measured at start
(best median rate of jitted float32 square `jnp.dot`s). Results go to --out (JSON,
written atomically) and a markdown table (suite; reference adds the PyTorch numbers;
e2e rows have no PyTorch reference).
"""
