"""Error types: each message says what is wrong and how to fix it; the CLI prints it on one line."""


class BuilderError(Exception):
    """Base class for every error the user can act on."""


class CheckpointError(BuilderError):
    """The input Hugging Face checkpoint is missing, corrupt or unsupported."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture is not one the builder supports."""


class TokenizerError(CheckpointError):
    """Tokenizer files are missing or cannot be loaded."""


class ConfigError(BuilderError):
    """A build option or engine setting is invalid."""


class OutputExistsError(BuilderError):
    """The output folder already exists and --force was not given."""


class RepositoryValidationError(BuilderError):
    """A rendered model repository failed validation."""


class RequestError(BuilderError):
    """An inference request is invalid (bad parameters, too long, ...)."""


class ServerError(BuilderError):
    """The Triton server could not be found, started or reached."""
