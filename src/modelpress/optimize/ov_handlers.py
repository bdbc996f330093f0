"""Technique handlers for one backend (being written)."""
