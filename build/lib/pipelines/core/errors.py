"""The base of every input error of the jobs, in a module of its own so that any module can raise it without
importing the config (and what the config imports)."""


class ConfigError(ValueError):
    """Bad user input (a config value, a path, a file); the message names the key or file and what is allowed.

    The base of every input error of the jobs (sampling, evaluation, checkpoints, ingest, storage), which print it
    and exit with status 2."""


class JobStopped(BaseException):
    """SIGINT or SIGTERM reached the driver (Ctrl-C, `ray job stop`, a scheduler, Kubernetes).

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way swallows it. The stage that
    was running says in `kept` what is kept (the last checkpoint's step, the finished sample blocks); the job prints
    one line and exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.kept: str | None = None

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class JobFailed(Exception):
    """A failure that is not the user's input but that the job can explain in one line (an object store that stopped
    answering): the job prints it and exits with status 1, without a traceback."""
