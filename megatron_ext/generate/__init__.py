"""Generation with KV / SSM caches, and budget control (think at one budget, answer at another).

Modules: :mod:`.config` (``GenerateConfig``), :mod:`.sampling` (greedy / seeded sampling),
:mod:`.decode` (cached decoding on megatron-core's static inference context, and its uncached
oracle), :mod:`.budget` (the think → answer switch and its per-phase timings), :mod:`.sources`
(the budgets of an elastic checkpoint or of standalone slices).

Importing this package applies nothing: the entry point applies
:func:`megatron_ext.compat.ensure_compat` first (see :mod:`megatron_ext.models`), so
megatron-core's inference modules see this machine's kernels.
"""
