"""Elastic many-in-one models: config, importance, reorder, elastic layers and slicing.

Importing this package applies nothing: the entry point applies
:func:`megatron_ext.compat.ensure_compat` first (see :mod:`megatron_ext.models`).
"""
