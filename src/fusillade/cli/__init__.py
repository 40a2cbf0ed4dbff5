"""The `fusillade` command line."""
