"""Runnable examples: `python -m tfp_ffjord.examples.moons`."""
