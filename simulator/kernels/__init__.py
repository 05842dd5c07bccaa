"""The hardware's primitive operations, computed the way the hardware computes them."""
