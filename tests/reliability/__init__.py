"""Helpers and fixture data for the reliability and security suite (tests/test_reliability_*.py)."""
