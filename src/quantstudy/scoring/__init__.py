"""How a model is scored: the Scorer protocol, the fast prefix-sharing scorer, generation, kernels, lm-eval's backend."""
