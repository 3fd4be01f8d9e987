"""Checkpoint tools: write (random init, zoo training), convert (HF -> NormSwap, LayerNorm -> RMSNorm), quantize."""
