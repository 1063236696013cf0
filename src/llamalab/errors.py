"""Errors that carry a one-line, user-facing message (the CLI prints them without a traceback)."""


class LlamalabError(ValueError):
    """Base class: bad input from the user (file, config, option), reported in one line."""


class ConfigError(LlamalabError):
    """A config that is malformed or describes a model llamalab cannot run faithfully."""


class WeightsError(LlamalabError):
    """A checkpoint that is missing, truncated, corrupt, or does not fit the config."""


class TokenizerError(LlamalabError):
    """A tokenizer that cannot be found or built."""


class DataError(ConfigError):
    """Training or fine-tuning data that cannot be found or read (a corpus, a folder, a JSONL line)."""
