"""Small shared helpers (command-line edges, logging)."""
