"""One module per CLI subcommand; see engine/__main__.py."""
