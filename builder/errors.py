"""Error types: each message says what is wrong and how to fix it; the CLI prints it on one line."""


class BuilderError(Exception):
    """Base class for every error the user can act on."""


class CheckpointError(BuilderError):
    """The input Hugging Face checkpoint is missing, corrupt or unsupported."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture is not one the builder supports."""


class TokenizerError(CheckpointError):
    """Tokenizer files are missing or cannot be loaded."""


class OutsideCheckpointError(CheckpointError):
    """A file the checkpoint names (a symlink, an index entry, a tokenizer path) lies outside the checkpoint folder."""


class ConfigError(BuilderError):
    """A build option or engine setting is invalid."""


class OutputExistsError(BuilderError):
    """The output folder already exists and --force was not given, or it is not something --force may replace."""


class OutputPathError(BuilderError):
    """The --output path cannot be used: a file in the way, no permission, a name too long, the --model folder."""


class RepositoryValidationError(BuilderError):
    """A rendered model repository failed validation."""


class RequestError(BuilderError):
    """An inference request is invalid (bad parameters, too long, ...)."""


class ServerError(BuilderError):
    """The Triton server could not be found, started or reached."""
