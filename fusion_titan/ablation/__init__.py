"""Equal-FLOPs ablation sweeps over run_train.sh (scripts/ablate.py, docs/ablations.md)."""
