"""Exit codes (the seed's failure-mode table) and the errors that carry them."""
EXIT_OK = 0
EXIT_USAGE = 1          # bad arguments, policy parse/validation error, bad input file
EXIT_BPF = 40           # BPF/BPF LSM unusable, load/attach failure, cgroup unresolvable: fail closed


class AssayError(Exception):
    """An error with a one-line reason for the user and the exit code it maps to."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: "int | None" = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(AssayError):
    exit_code = EXIT_USAGE


class BpfError(AssayError):
    """Anything that keeps BPF from loading or attaching, or the scope from resolving."""

    exit_code = EXIT_BPF


class InputError(AssayError):
    """Bad user input in a file: the message names FILE:LINE:COL and what is allowed."""

    exit_code = EXIT_USAGE

    def __init__(self, path: str, line: int, col: int, message: str):
        self.path, self.line, self.col = path, line, col
        super().__init__(f"{path}:{line}:{col}: {message}")
