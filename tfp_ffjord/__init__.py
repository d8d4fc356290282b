"""tfp_ffjord."""
