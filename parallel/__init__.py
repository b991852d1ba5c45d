"""Everything that talks to other ranks."""
