"""Shared helpers of the tests (configs, data, subprocess runners); test files import from here,
never from each other."""
