"""Small helpers used across fedbrats: atomic and exclusive file writes, "did you mean"
hints, array conversion, device choice, markdown tables and pyplot set-up.
"""
