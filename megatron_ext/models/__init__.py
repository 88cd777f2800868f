"""The hybrid Mamba / attention / MoE model on megatron-core.

Importing this package applies :func:`megatron_ext.compat.ensure_compat` first, so the
megatron-core model modules imported by its submodules always see the shims this machine
needs (CPU device redirects, pure-PyTorch Mamba kernels, torch norms).
"""

from megatron_ext.compat import ensure_compat

ensure_compat()
