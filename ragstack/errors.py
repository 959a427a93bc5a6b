class InvalidInput(ValueError):
    """Bad request input: maps to Triton's INVALID_ARG; the message names the problem."""
