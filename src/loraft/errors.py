class LoraftError(Exception):
    """A problem with the user's input: the CLI prints the message alone and exits with code 2."""
