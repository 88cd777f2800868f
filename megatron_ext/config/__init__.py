"""Typed run configs shared by the recipes, and their registration with Hydra."""
