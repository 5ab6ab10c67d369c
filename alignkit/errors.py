"""Errors for mistakes in the user's input. Each message is a sentence: what was wrong, where, what to do.

They subclass ValueError so library callers can catch them generically; the CLI prints them without a traceback.
"""


class UserError(ValueError):
    """Base for every error caused by user input (files, configs, arguments)."""


class ConfigError(UserError):
    """A config or recipe key that is unknown, mistyped or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint file or directory that cannot be loaded: names the file and the tensor or key."""


def check_at_least(section: str, obj: object, minimum: int, names: tuple[str, ...]) -> None:
    """A ConfigError naming `section.name` when any of `obj`'s `names` is below `minimum`."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            rule = "at least 1" if minimum == 1 else f"{minimum} or more"
            raise ConfigError(f"{section}.{name} must be {rule}; got {value}.")


class DataError(UserError):
    """A dataset file or record that cannot be used: names the file, line or record index, and field."""
