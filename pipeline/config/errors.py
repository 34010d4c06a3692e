"""The config's error type and checks, shared by every section."""


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


def positive(section: str, **values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value}")
