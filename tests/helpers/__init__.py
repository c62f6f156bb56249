"""Helpers shared by several test modules and by the subprocess scripts some tests run."""
