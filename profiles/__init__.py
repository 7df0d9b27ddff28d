"""diffsplit.profiles package."""
