"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserInputError(Exception):
    """Input the user can fix: a file, key or value that is not what was expected.

    The message is a single line that names the offending file/key/value and what was expected.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
