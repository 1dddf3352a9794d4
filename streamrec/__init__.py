"""The streamrec command line: the one place that wires the packages together."""
