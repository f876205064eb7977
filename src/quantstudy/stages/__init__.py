"""The stages of a study, one module each: resolve, train, quantize, evaluate, measure, fidelity."""
