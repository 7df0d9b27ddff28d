"""diffsplit.engine.models package."""
