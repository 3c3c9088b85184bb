"""One module per CLI command; each defines `command`. Found by `netanatomy.cli.main.LazyGroup`."""
