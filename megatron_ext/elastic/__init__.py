"""Star Elastic: nested submodels of one parent, one per budget."""
