"""Training machinery shared by the parent and elastic recipes."""
