"""One module per CLI command, each exposing ``command`` (a click command)."""
