"""One home per layer kind: each module here owns one kind's elastic axes (see ``base.Site``).

The registry is :mod:`.registry`; this package imports nothing itself, so the layer classes
(which read :mod:`.base`) and the sites (which read the layer classes) never import each
other in a circle.
"""
