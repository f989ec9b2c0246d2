"""Day-2 operations on deployed nodes (`sdnode` command line): inventory resolution, SSH, the node's
service reached over SSH, and the pure helpers (metrics, manifests, grid) behind each subcommand."""


class Day2Error(Exception):
    """An expected failure (unreachable node, bad inventory...): the CLI prints it as one line."""
