"""One module per runtime."""
