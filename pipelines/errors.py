"""The base of every input error of the jobs, in a module of its own so that any module can raise it without
importing the config (and what the config imports)."""


class ConfigError(ValueError):
    """Bad user input (a config value, a path, a file); the message names the key or file and what is allowed.

    The base of every input error of the jobs (sampling, evaluation, checkpoints, ingest, storage), which print it
    and exit with status 2."""
