"""The architecture: config (what the fields mean), norms and FFN variants (the switch), the vLLM model, the same
model for transformers, and a pure-torch reference written straight from the formulas."""
