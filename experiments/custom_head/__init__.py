"""A head and a loss written outside ssdjax, trained and served by config alone (README.md here)."""
