"""Triton kernels for GPT-2. Each op lives in its own module; this package only hands names on."""
