"""One exception type for every mistake a user can make, so the CLI can turn it into one line and exit code 2."""


class ConfigError(ValueError):
    """Bad input from the user: the message names the problem and says what to do."""
