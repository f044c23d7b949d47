"""The experiments: run each from the repo root as a module, e.g. `python -m experiments.bench scan`
(see experiments/README.md). They import the core (model, scan, kernels) and common, never each other."""
