"""ct_cli: thin entry points (ct-train, ct-recipe, ct-eval, ct-export, ct-datamix, ct-plan): arguments,
Hydra composition and one-line user errors; the work itself is done by the packages below."""
