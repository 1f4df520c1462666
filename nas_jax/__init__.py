"""nas_jax: NAS (Negative Augmented Samples) and ALBEF vision-language pretraining in JAX/Flax."""

__version__ = "0.1.0"
