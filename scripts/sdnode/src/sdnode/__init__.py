"""Controller-side tools for sdnode."""
