"""Backends of sparse_hetconv (placeholder docstring; the backend registry replaces this file)."""
