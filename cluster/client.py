"""Reaching a cluster's job server: the address, token auth, and plain errors when it fails.

The address is `--address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else a head on this
machine (http://127.0.0.1:8265). Token auth is Ray's own: with `RAY_AUTH_MODE=token`, Ray's client
sends the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from raylm.core.errors import UserError

LOCAL_HEAD = "http://127.0.0.1:8265"
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def resolve_address(address: str | None) -> str:
    """The job server's address: the flag, then the environment, then the local head."""
    if address:
        return address
    for name in ADDRESS_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return LOCAL_HEAD


@contextlib.contextmanager
def _address_in_environment(address: str) -> Iterator[None]:
    # Ray's client lets RAY_ADDRESS override the address it is given; an explicit --address must
    # win, so the variables say the same thing while the client is built.
    saved = {name: os.environ.get(name) for name in ADDRESS_VARIABLES}
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    os.environ["RAY_ADDRESS"] = address
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def auth_refused_message(address: str, detail: str) -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "(unset)")
    return (
        f"the Ray cluster at {address} refused this client's authentication token "
        f"(RAY_AUTH_MODE={mode}): {detail.strip().splitlines()[0]}. Set RAY_AUTH_MODE=token and the "
        "cluster's token in RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH); `ray get-auth-token` on the "
        "head prints it"
    )


# Ray's client logs each packaging step at INFO, and warns on every submit that .git/.venv are
# excluded (ours are anyway); a size warning near the upload limit is still shown.
QUIETER_LOGGERS = {
    "ray._private.runtime_env.packaging": logging.WARNING,
    "ray._private.runtime_env.working_dir": logging.ERROR,
    "ray.dashboard.modules.dashboard_sdk": logging.WARNING,
    "ray.dashboard.modules.job.sdk": logging.WARNING,
}


def quiet_client_logs() -> None:
    for name, level in QUIETER_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def connect(address: str | None = None):
    """A `JobSubmissionClient` for the cluster, or a UserError that says why there is none."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    quiet_client_logs()

    url = resolve_address(address)
    try:
        with _address_in_environment(url):
            return JobSubmissionClient(url)
    except AuthenticationError as err:
        raise UserError(auth_refused_message(url, str(err))) from None
    except ConnectionError:
        raise UserError(
            f"no Ray cluster answers at {url}: start one with `ray start --head`, or pass "
            "--address http://HEAD:8265 (or set RAY_ADDRESS) for a remote one"
        ) from None


def translate_job_errors(address: str, job_id: str, err: Exception) -> UserError | None:
    """A UserError for job-server failures a user can act on, or None for real bugs."""
    from ray.exceptions import AuthenticationError

    if isinstance(err, AuthenticationError):
        return UserError(auth_refused_message(address, str(err)))
    if not isinstance(err, (RuntimeError, ConnectionError)):
        return None
    text = str(err)
    if "404" in text or "does not exist" in text:
        return UserError(f"no job {job_id!r} on the cluster at {address}; `raylm jobs list` shows them")
    if isinstance(err, ConnectionError):
        return UserError(f"lost the connection to the Ray cluster at {address} ({text})")
    return None


@contextlib.contextmanager
def job_errors_as_user_errors(address: str, job_id: str):
    """Re-raise job-server failures a user can act on as one-line UserErrors; bugs keep their traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        user_error = translate_job_errors(address, job_id, err)
        if user_error is None:
            raise
        raise user_error from None
