"""Configuration of ``kvsync serve`` (SPEC section 5).

Every key can come from the TOML file given with ``--config``, from
``KVSYNC_<KEY>`` in the environment and from a flag; a flag wins over the
environment, which wins over the file, which wins over the defaults.
Tables (``kubernetes``, ``tier_weights``) are merged key by key across the
three, and in the environment they are JSON (``KVSYNC_TIER_WEIGHTS='{"cpu":
0.5}'``). An invalid value or an unknown key raises ``ConfigError`` naming
the key; ``kvsync serve`` turns it into exit status 2.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = ["ConfigError", "KubernetesConfig", "Settings", "is_loopback", "load"]

Policy = Literal["prefix", "prefix-load", "least-load", "random"]
TIERS = ("gpu", "cpu", "storage")
DEFAULT_TIER_WEIGHTS = {"gpu": 1.0, "cpu": 0.75, "storage": 0.25}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


class KubernetesConfig(BaseModel):
    """The ``[kubernetes]`` table (SPEC section 6). Parsed and validated
    here; the discovery source that uses it lives in ``kvsync.discovery``."""

    model_config = ConfigDict(extra="forbid")

    kubeconfig: str | None = None
    namespace: str | None = None
    selector: str = "kvsync.io/kv-events=true"
    model_labels: list[str] = Field(
        default_factory=lambda: ["kvsync.io/model", "model.aibrix.ai/name"], min_length=1
    )

    @field_validator("model_labels", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        # A flag or an environment variable gives "a,b".
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v


class Settings(BaseSettings):
    """Every key of ``kvsync serve``; see docs/service.md for each one."""

    model_config = SettingsConfigDict(
        env_prefix="KVSYNC_", extra="forbid", case_sensitive=False, validate_default=True
    )

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8080, ge=0, le=65535)
    token: SecretStr | None = None
    insecure: bool = False
    pods: Path | None = None
    kubernetes: KubernetesConfig | None = None
    snapshot: Path | None = None
    snapshot_interval: float = Field(60.0, gt=0, allow_inf_nan=False)
    capacity_blocks: int | None = Field(None, ge=1)
    hash_seed: int = Field(1337, ge=0, lt=1 << 64)
    policy: Policy = "prefix-load"
    peer: str | None = None
    max_body_bytes: int = Field(8 << 20, ge=1024)
    ready_grace: float = Field(10.0, ge=0, allow_inf_nan=False)
    speculative_ttl: float = Field(2.0, ge=0, allow_inf_nan=False)
    load_ttl: float = Field(300.0, gt=0, allow_inf_nan=False)
    load_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    tier_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TIER_WEIGHTS))
    topic: str = ""
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("token", mode="before")
    @classmethod
    def _token(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty (leave it unset for no token)")
        return v

    @field_validator("peer")
    @classmethod
    def _peer(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.startswith(("http://", "https://")) or len(v.split("://", 1)[1]) == 0:
            raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
        return v.rstrip("/")

    @field_validator("tier_weights", mode="before")
    @classmethod
    def _tiers(cls, v: Any) -> Any:
        if isinstance(v, str):  # flag form: gpu=1,cpu=0.5
            pairs = [p for p in v.split(",") if p.strip()]
            out: dict[str, Any] = {}
            for p in pairs:
                name, sep, value = p.partition("=")
                if not sep:
                    raise ValueError(
                        f"expected tier=weight pairs such as gpu=1,cpu=0.75, got {v!r}"
                    )
                out[name.strip()] = value.strip()
            return out
        return v

    @field_validator("tier_weights")
    @classmethod
    def _tier_values(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if name not in TIERS:
                raise ValueError(f"unknown tier {name!r} (tiers: {', '.join(TIERS)})")
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {w}")
        return {**DEFAULT_TIER_WEIGHTS, **v}

    @field_validator("log_level", "log_format", "policy", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (passed as init arguments) > environment > the TOML file.
        return (init_settings, _EnvSource(settings_cls, env_settings), _FileSource(settings_cls))

    def token_value(self) -> str | None:
        return None if self.token is None else self.token.get_secret_value()


class _EnvSource(PydanticBaseSettingsSource):
    """``KVSYNC_<KEY>``, less Kubernetes' service links: a Service named
    ``kvsync`` puts ``KVSYNC_PORT=tcp://10.96.0.7:8080`` into every pod of its
    namespace, which is not a port setting."""

    def __init__(self, settings_cls: type[BaseSettings], env: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.env.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        data = dict(self.env())
        port = data.get("port")
        if isinstance(port, str) and port.startswith(("tcp://", "udp://")):
            del data["port"]
        return data


class _FileSource(PydanticBaseSettingsSource):
    """The ``--config`` TOML file, handed over through ``_FILE_DATA``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _FILE_DATA.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_DATA)


_FILE_DATA: dict[str, Any] = {}


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None


def load(config: str | Path | None = None, flags: Mapping[str, Any] | None = None) -> Settings:
    """Settings from the file ``config`` (if any), the environment and
    ``flags`` (only the keys given); ``ConfigError`` names each bad key."""
    global _FILE_DATA
    data = read_toml(config) if config is not None else {}
    if config is not None:
        base = Path(config).resolve().parent
        # Relative paths in a file are relative to the file, so that
        # `kvsync serve --config deploy/kvsync.toml` works from anywhere.
        for key in ("pods", "snapshot"):
            value = data.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                data[key] = str(base / value)
    _FILE_DATA = data
    try:
        return Settings(**dict(flags or {}))
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None
    finally:
        _FILE_DATA = {}


def _describe(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(config)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        given = err.get("input")
        shown = (
            ""
            if err["type"] == "extra_forbidden" or isinstance(given, dict)
            else f" (got {given!r})"
        )
        if key == "token":
            shown = ""  # never echo a secret
        lines.append(f"`{key}`: {msg}{shown}")
    return "invalid configuration: " + "; ".join(lines)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
