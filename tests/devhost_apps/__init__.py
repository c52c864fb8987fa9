"""Tiny function apps used by tests/test_devhost.py (not the relay)."""
