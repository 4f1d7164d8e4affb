"""Sweep runner: one training run per sweep point, then tables and plots.

    python -m experiments.sweep --config configs/switch.py:small \
        --sweep experts --workdir runs/sweeps/switch_small_experts \
        [--seeds 2] [--parallel N] [--no_baseline] [--config.k=v ...]

Sweeps are declared next to their config: `get_sweeps(arg)` in the config
file returns {sweep name: [point, ...]}, a point being {dotted config key:
value} (several keys at once are fine, e.g. top_k with d_ff at fixed active
FLOPs). `--sweep KEY=v1,v2,...` runs an ad-hoc one-key sweep instead
(values parsed like `--config.KEY=v`). `--config.KEY=v` overrides apply to
every point and, except the MoE-only `model.moe.*` ones, to the baseline.

Runs: point p at seed s trains in `<workdir>/<p's overrides>,seed=<s>`
(seeds: the config's seed + 0 .. --seeds - 1) with the normal trainer in a
subprocess (`python -m experiments.sweep point ...`: `experiments.train`'s
main, then the post-hoc analysis of `analyse`), so a crash stays in its
point. Unless --no_baseline, the dense config of the same size
(`configs/dense.py:<variant>` next to the swept config, --baseline_config to
change) is run at every seed with the --config overrides outside
model.moe.*, as `<baseline_root>/dense,seed=<s>` (baseline_root defaults to
--workdir; share it between sweeps to train the baseline once). It is the
reference of the 'Δ dense' column: same data, steps, seeds and width, and
the active FLOPs per token of a top-1 model (its FFN is one expert wide), so
"MoE beats dense" is read at equal compute per token. Re-running the same
command skips every finished run (its eval of the last step is in
metrics.jsonl and its analysis.json exists), resumes interrupted ones from
their checkpoints and retries failed ones. Before the first run trains,
every run's config is validated as the trainer would (`config_lib.
validate_config`) and its data built: a bad value in any point stops the
sweep at once with exit code 2 and a message naming the point and the key.
A run that fails later is reported (exit code, last stderr lines) and the
others go on; the exit code is then 1.
Ctrl-C (or SIGTERM) stops the running trainers with SIGTERM, so they
checkpoint first. The runs share JAX's persistent compilation cache in
<workdir>/.jax_cache (--compilation_cache DIR or none), which only skips
recompiling programs seen before; it never changes a result.

Outputs in --workdir: results.csv (one row per point, mean and std over
seeds), runs.csv (one row per run), results.md (the table, per-layer
specialisation, failures, plots) and plots/{metrics_vs_value,loss_curves,
expert_load}.png. Each run dir also holds sweep_point.json (overrides,
trainer command, attempts with exit code and wall time), sweep_stdout.log,
sweep_stderr.log and analysis.json (params, per-layer eval expert load,
drops, max-violation and specialisation NMI; see moejax.analysis).

Other forms:
    python -m experiments.sweep analyse RUN_DIR   # analysis.json of a run
    python -m experiments.sweep point <experiments.train arguments>
"""

from experiments.sweep.cli import main

__all__ = ['main']
