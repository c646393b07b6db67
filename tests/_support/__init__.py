"""Helpers and worker scripts for the tests (not collected by pytest)."""
