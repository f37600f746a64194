"""The coordinating side of fedbrats: the Flower ServerApp and the plain functions it calls."""
