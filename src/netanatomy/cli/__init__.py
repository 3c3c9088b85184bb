"""Thin command-line shells over the library; see `netanatomy --help`."""
