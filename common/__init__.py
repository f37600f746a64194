"""The data contract, BraTS I/O, models, losses and metrics shared by clients and server."""
