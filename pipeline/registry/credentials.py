"""Where registry credentials come from: the containers auth file, Docker's config.json,
credential helpers.

`CredentialSources` reads the files as podman and skopeo do: the containers auth file
(`--authfile`, else `$REGISTRY_AUTH_FILE`, else `$XDG_RUNTIME_DIR/containers/auth.json`),
then Docker's config.json. In each file (`DockerConfig.credentials_for`, the same format), in
Docker's order: `credHelpers[registry]`, then `credsStore`, then `auths[registry]`.
How they are sent is auth.py's job. Secrets stay out of reprs, log lines and messages.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError

HUB_SERVER = "https://index.docker.io/v1/"  # the key `docker login` uses for Docker Hub
_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
IDENTITY_TOKEN_USER = "<token>"  # Docker's marker: the password is an OAuth refresh token
_HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """A username and password (or identity token); the secret stays out of the repr."""

    username: str
    password: str = field(repr=False)

    @property
    def is_identity_token(self) -> bool:
        return self.username == IDENTITY_TOKEN_USER

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def describe(self) -> str:
        """Who we authenticated as, safe for messages."""
        return "an identity token" if self.is_identity_token else f"user {self.username!r}"


def _host_of(key: str) -> str:
    """`https://host:5000/v1/` -> `host:5000`: Docker stores auths under URLs or hostnames."""
    key = key.strip()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0].lower()


def _same_registry(key: str, registry: str) -> bool:
    host, wanted = _host_of(key), registry.lower()
    if wanted in _HUB_NAMES:
        return host in _HUB_NAMES
    return host == wanted


class DockerConfig:
    """The parts of Docker's config.json that say how to log in to registries."""

    def __init__(self, data: Mapping[str, Any] | None = None, path: Path | None = None,
                 what: str = "Docker config") -> None:
        data = data or {}
        self.path = path
        self.what = what  # how messages name the file: "Docker config" or "auth file"
        auths, helpers = data.get("auths"), data.get("credHelpers")
        self.auths: dict[str, Any] = auths if isinstance(auths, dict) else {}
        self.cred_helpers: dict[str, str] = helpers if isinstance(helpers, dict) else {}
        store = data.get("credsStore")
        self.creds_store: str | None = store if isinstance(store, str) and store else None

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> DockerConfig:
        """Read `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`; none -> empty."""
        env = os.environ if env is None else env
        if env.get("DOCKER_CONFIG"):
            path = Path(env["DOCKER_CONFIG"]) / "config.json"
        else:
            home = env.get("HOME")
            path = (Path(home) if home else Path.home()) / ".docker" / "config.json"
        return cls.read(path, "Docker config", missing_ok=True)

    @classmethod
    def read(cls, path: Path, what: str, *, missing_ok: bool) -> DockerConfig:
        """One credentials file; a missing one is empty when `missing_ok`, else UsageError."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if missing_ok:
                return cls(path=path, what=what)
            raise UsageError(f"cannot read {what} {path}: No such file or directory") from None
        except OSError as e:
            raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            # The position only, never the text: the file holds secrets.
            raise UsageError(
                f"{what} {path} is not valid JSON (line {getattr(e, 'lineno', '?')})"
            ) from None
        if not isinstance(data, dict):
            raise UsageError(f"{what} {path} is not a JSON object")
        return cls(data, path, what)

    def credentials_for(self, registry: str) -> Credentials | None:
        """Credentials for `registry` (a host[:port] or docker.io), or None for anonymous."""
        hub = registry.lower() in _HUB_NAMES
        server = HUB_SERVER if hub else registry
        helper = next((h for k, h in self.cred_helpers.items()
                       if isinstance(h, str) and _same_registry(k, registry)), None)
        if helper:
            return _run_helper(helper, server)
        if self.creds_store:
            found = _run_helper(self.creds_store, server)
            if found is not None:
                return found
        # Exact keys first (Docker's own lookup), then any key naming the same host.
        keys = [k for k in dict.fromkeys((server, registry)) if k in self.auths]
        keys += [k for k in self.auths if k not in keys and _same_registry(k, registry)]
        for key in keys:
            creds = self._from_auth_entry(key)
            if creds is not None:
                return creds
        return None

    def _from_auth_entry(self, key: str) -> Credentials | None:
        entry = self.auths.get(key)
        if not isinstance(entry, dict):
            return None
        if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
            return Credentials(IDENTITY_TOKEN_USER, entry["identitytoken"])
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                sep = ""
            if not sep:
                raise UsageError(
                    f"{self.what} {self.path}: auths[{key!r}].auth is not base64 'user:password'"
                )
            return Credentials(user, password)
        user, password = entry.get("username"), entry.get("password")
        if isinstance(user, str) and user and isinstance(password, str):
            return Credentials(user, password)
        return None


class CredentialSources:
    """The credentials files in the order podman and skopeo read them: the first that has
    credentials for a registry gives them."""

    def __init__(self, configs: Sequence[DockerConfig]) -> None:
        self.configs = tuple(configs)

    @classmethod
    def load(
        cls, env: Mapping[str, str] | None = None, authfile: Path | None = None
    ) -> CredentialSources:
        """`authfile` (--authfile), else `$REGISTRY_AUTH_FILE`, else
        `$XDG_RUNTIME_DIR/containers/auth.json`; then Docker's config. A file named by the
        user must be readable (UsageError); the default locations may be absent."""
        env = os.environ if env is None else env
        named = authfile or (Path(env["REGISTRY_AUTH_FILE"]) if env.get("REGISTRY_AUTH_FILE")
                             else None)
        if named is not None:
            containers = DockerConfig.read(named, "auth file", missing_ok=False)
        elif env.get("XDG_RUNTIME_DIR"):
            path = Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
            containers = DockerConfig.read(path, "auth file", missing_ok=True)
        else:
            containers = DockerConfig()
        return cls([containers, DockerConfig.load(env)])

    def credentials_for(self, registry: str) -> Credentials | None:
        for config in self.configs:
            creds = config.credentials_for(registry)
            if creds is not None:
                return creds
        return None


def _run_helper(helper: str, server: str) -> Credentials | None:
    """`docker-credential-<helper> get` with the server URL on stdin (Docker's protocol)."""
    import subprocess  # here, not at the top: most runs use no credential helper

    if not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
        raise UsageError(f"invalid credential helper name {helper[:60]!r} in Docker config")
    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run(
            [program, "get"], input=server.encode(), capture_output=True,
            timeout=_HELPER_TIMEOUT, check=False,
        )
    except FileNotFoundError:
        raise UsageError(f"credential helper {program} not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"credential helper {program} timed out for {server}") from None
    if done.returncode != 0:
        said = (done.stdout or done.stderr).decode(errors="replace").strip()
        if "credentials not found" in said.lower():
            return None
        first = said.splitlines()[0][:200] if said else f"exit status {done.returncode}"
        raise UsageError(f"credential helper {program} failed for {server}: {first}")
    try:
        obj = json.loads(done.stdout)
        username, secret = obj["Username"], obj["Secret"]
    except (ValueError, KeyError, TypeError):
        username = secret = None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise UsageError(f"credential helper {program} gave unreadable output for {server}")
    return Credentials(username, secret)
