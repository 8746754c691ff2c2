"""Settings as the command line sees them: flags, env variables, defaults, one-line errors.

`SETTING_FLAGS` is the one mapping from a setting to its `splitvlm rx serve` / `tx serve`
flag; every setting without a flag is set by its env variable (`env_var`). `build_settings`
turns a bad value, from a flag or from the environment, into one SettingError line that names
the setting, where the value came from and what is wrong with it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, SettingsError

from shared import __version__
from shared.config import RxSettings, TxSettings
from shared.errors import SettingError

SETTINGS: dict[str, type[BaseSettings]] = {"rx": RxSettings, "tx": TxSettings}

# setting -> flag of `splitvlm rx serve` / `splitvlm tx serve` (tests check that each exists).
SETTING_FLAGS: dict[str, dict[str, str]] = {
    "rx": {
        "model": "--model",
        "split_point": "--split",
        "host": "--host",
        "grpc_port": "--grpc-port",
        "http_port": "--http-port",
        "codecs": "--codecs",
        "codec_artifacts": "--codec-artifact",
        "fold_decoder": "--fold-decoder",
        "max_prompt_chars": "--max-prompt-chars",
        "grpc_workers": "--grpc-workers",
        "log_level": "--log-level",
        "log_json": "--log-json",
    },
    "tx": {
        "model": "--model",
        "split_point": "--split",
        "host": "--host",
        "port": "--port",
        "rx_address": "--rx",
        "codec": "--codec",
        "codec_artifacts": "--codec-artifact",
        "max_prompt_chars": "--max-prompt-chars",
        "rx_timeout_s": "--rx-timeout-s",
        "grpc_workers": "--grpc-workers",
        "metrics_port": "--metrics-port",
        "log_level": "--log-level",
        "log_json": "--log-json",
    },
}


def env_var(role: str, name: str) -> str:
    prefix = str(SETTINGS[role].model_config.get("env_prefix", ""))
    return (prefix + name).upper()


def show(value: Any) -> str:
    """A setting's value as you would type it (lists comma-separated, enums by value)."""
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if hasattr(value, "value"):
        return str(value.value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def default_of(role: str, name: str) -> str:
    field = SETTINGS[role].model_fields[name]
    return show(field.get_default(call_default_factory=True))


def default_help(role: str, name: str) -> str:
    """`show_default` text for a flag whose value falls back to the setting: ``50061; env SPLITVLM_…``."""
    return f"{default_of(role, name) or '(none)'}; env {env_var(role, name)}"


def build_settings(role: str, **flags: Any) -> BaseSettings:
    """Settings from the environment, overridden by the flags that were given (not None).

    A variable with the service's prefix that names no setting (a typo, or a setting of a newer
    version such as TLS) is refused: silently ignoring it could leave a link unprotected.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    known = {env_var(role, name) for name in SETTINGS[role].model_fields}
    prefix = env_var(role, "")
    unknown = sorted(k for k in os.environ if k.upper().startswith(prefix) and k.upper() not in known)
    if unknown:
        raise SettingError(
            f"unknown {role} setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            "in the environment "
            f"(not a setting of splitvlm {__version__}; `splitvlm config show {role}` lists them): "
            "fix the name or unset it"
        )
    try:
        return SETTINGS[role](**given)
    except ValidationError as exc:
        raise SettingError(describe(role, exc, set(given))) from None
    except SettingsError as exc:
        raise SettingError(_describe_source_error(role, exc)) from None


def describe(role: str, exc: ValidationError, from_flags: set[str]) -> str:
    """One line for every problem in ``exc``: where the value came from, what is wrong, the fix."""
    problems = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err.get("loc") else "?"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown {role} setting {name!r} (see `splitvlm config show {role}`)")
            continue
        env, flag = env_var(role, name), SETTING_FLAGS[role].get(name)
        where = (
            f"{flag} {show(err.get('input'))}"
            if name in from_flags and flag
            else f"{env}={err.get('input')!r}"
        )
        fix = f"set {flag} or {env}" if flag else f"set {env}"
        problems.append(f"invalid {where}: {_lower_first(err['msg'])}; {fix} to a valid value")
    return "; ".join(problems)


def _describe_source_error(role: str, exc: SettingsError) -> str:
    match = re.search(r'field "(\w+)"', str(exc))
    name = match.group(1) if match else ""
    if not name:
        return f"invalid {role} settings in the environment: {exc}"
    return (
        f"invalid {env_var(role, name)}: not a comma-separated list nor a JSON list; "
        "write it as a,b,c (e.g. SPLITVLM_RX_CODECS=int8,fp16)"
    )


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def settings_rows(role: str, settings: BaseModel) -> list[tuple[str, str, str, str, str]]:
    """(setting, env variable, flag, default, current) for every setting of ``role``."""
    rows = []
    for name in SETTINGS[role].model_fields:
        rows.append(
            (
                name,
                env_var(role, name),
                SETTING_FLAGS[role].get(name, "-"),
                default_of(role, name),
                show(getattr(settings, name)),
            )
        )
    return rows


def check_codecs(role: str, settings: Any) -> None:
    """Refuse a bad codec setting before the model loads (the engines check again, with artifacts)."""
    from shared.codecs import build_codec
    from shared.codecs.calibrate import parse_stages
    from shared.codecs.calibration import needs_calibration
    from shared.errors import CodecError

    name = "codecs" if role == "rx" else "codec"
    specs = settings.codecs if role == "rx" else [settings.codec]
    if settings.codec_artifacts:
        return  # calibrated specs need their artifacts: the engine checks them after loading
    for spec in specs:
        if role == "rx" and spec in ("any", "ladder"):
            continue
        try:
            _, stages = parse_stages(spec)
            if not any(map(needs_calibration, stages)):  # calibrated ones: their artifact decides
                build_codec(spec)
        except CodecError as exc:
            raise SettingError(
                f"invalid codec {spec!r} in {env_var(role, name)} / {SETTING_FLAGS[role][name]}: {exc}"
            ) from None
