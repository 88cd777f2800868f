"""The hybrid Mamba / attention / MoE model on megatron-core.

Importing this package applies nothing: an entry point (the CLI, the test conftest, a bench or
torchrun case script) calls :func:`megatron_ext.compat.ensure_compat` once, before
megatron-core's model modules are imported (the triton stub must come first on a machine
without triton).
"""
