"""Elastic many-in-one models: config, importance, reorder, elastic layers and slicing.

Importing this package applies :func:`megatron_ext.compat.ensure_compat` first (as
:mod:`megatron_ext.models` does), so its submodules can import megatron-core model modules.
"""

from megatron_ext.compat import ensure_compat

ensure_compat()
