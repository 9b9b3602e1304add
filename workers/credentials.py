"""Where the distributed commands get their secrets: the broker URL and Flower's logins.

A secret on a command line is readable by every user of the machine
(/proc/PID/cmdline, `ps`). So each one can come from the environment or from a file as
well as from a flag, and the commands hand them to the processes they start by
environment only (readable by the same user alone). Errors name a file, never its content.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.errors import UsageError

BROKER_ENV, BROKER_FILE_ENV = "LAYERWARM_BROKER_URL", "LAYERWARM_BROKER_URL_FILE"
FLOWER_AUTH_ENV, FLOWER_OWN_ENV = "LAYERWARM_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH"


def read_secret_file(path: str, what: str) -> str:
    """The one value a secret file holds (surrounding whitespace and newline dropped)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {what} file {path}: "
                         f"{getattr(e, 'strerror', None) or type(e).__name__}") from None
    if not value:
        raise UsageError(f"{what} file {path} is empty")
    return value


def resolve_broker_url(
    flag: str | None, flag_file: str | None, env: Mapping[str, str],
) -> str | None:
    """The broker URL from --broker, --broker-file, LAYERWARM_BROKER_URL or
    LAYERWARM_BROKER_URL_FILE, in that order; None means the default."""
    if flag:
        return flag
    if flag_file:
        return read_secret_file(flag_file, "broker URL")
    if env.get(BROKER_FILE_ENV):
        if env.get(BROKER_ENV):
            raise UsageError(f"both {BROKER_ENV} and {BROKER_FILE_ENV} are set; set one")
        return read_secret_file(env[BROKER_FILE_ENV], "broker URL")
    return env.get(BROKER_ENV) or None


def flower_logins(flag: str | None, flag_file: str | None, env: Mapping[str, str]) -> str | None:
    """The `user:password[,user:password...]` logins Flower accepts, or None for none.

    From --basic-auth, --basic-auth-file (one login a line), LAYERWARM_FLOWER_BASIC_AUTH
    or Flower's own FLOWER_BASIC_AUTH, in that order.
    """
    if flag:
        value = flag
    elif flag_file:
        text = read_secret_file(flag_file, "Flower login")
        value = ",".join(line.strip() for line in text.splitlines() if line.strip())
    else:
        value = env.get(FLOWER_AUTH_ENV) or env.get(FLOWER_OWN_ENV) or ""
    if not value:
        return None
    for login in value.split(","):  # Flower splits FLOWER_BASIC_AUTH at commas
        user, sep, password = login.partition(":")
        if not (user and sep and password):
            raise UsageError("Flower logins must be USER:PASSWORD, several separated by "
                             "commas (so a password cannot hold a comma)")
    return value
