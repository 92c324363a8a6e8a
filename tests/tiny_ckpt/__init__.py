"""Writers of tiny random checkpoints in the official file layouts and key names."""
