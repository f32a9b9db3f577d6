"""The demo: a tiny model and shapes data made in code, the three stages on them, and measures of what was learned
(`python -m t2i.demo`, `make demo`). Nothing in the product imports it."""
