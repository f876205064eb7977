"""quantstudy: reproducible post-training quantization studies with honest statistics."""

__version__ = "0.1.0"
