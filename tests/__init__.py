"""layerwarm test suite."""
