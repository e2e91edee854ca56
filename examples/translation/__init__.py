"""Date normalisation with the Transformer encoder-decoder: data, model, decoding, plots
(``python examples/translation.py``; see README.md here)."""
