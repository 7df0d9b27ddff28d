"""diffsplit.engine.nodes package."""
