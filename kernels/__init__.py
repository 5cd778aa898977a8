"""Triton kernels, one op per file, each with a pure-torch <op>_ref twin."""
