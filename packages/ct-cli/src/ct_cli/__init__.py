"""ct_cli: thin entry points (ct-train, ct-pipeline, ct-eval, ct-export); Hydra composition only."""
