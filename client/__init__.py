"""The site side of fedbrats: the Flower ClientApp and the plain functions it calls."""
