"""Chat models over this package's runtimes (one module per runtime)."""
