"""diffsplit.engine.sampling package."""
