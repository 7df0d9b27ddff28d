"""diffsplit.engine package."""
