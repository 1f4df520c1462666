"""PyTorch reference implementations run in the .torchref venv (Python 3.11) by the `run_torch`
fixture. Nothing here is imported by the JAX side."""
