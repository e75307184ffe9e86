"""The Hugging Face hub as the fetch stages use it: ``huggingface_hub`` resolves, lists and downloads, and this
module adds what that client leaves out.

What the client (2.4) does itself, relied on here:

- a file download retries 408 and 429 answers (``Retry-After`` honoured) and, when the connection drops
  mid-file, resumes from the bytes it has (an HTTP ``Range`` request), five times in a row; a file that ends
  short is refused (its size against the hub's);
- the tree listing retries 429 and 5xx answers with backoff, and a file's metadata request (HEAD) is tried
  again with backoff when no copy is cached;
- a file is written to a temporary name in the cache, removed on failure, and renamed to ``blobs/<ETag>`` when
  complete: nothing partial under a final name;
- with ``HF_HUB_OFFLINE=1``, or when the hub cannot be reached, a revision resolves from the cache's ``refs/``.

What is added here:

- every request the client sends without a timeout (the revision info and the tree listing) gets one,
  ``HF_HUB_ETAG_TIMEOUT`` seconds, so that a hub that stops answering fails the stage instead of hanging it;
- the revision info and the whole snapshot are tried again on transient failures the client gives up on (a
  5xx or a timeout of the revision request, a 5xx on a file download), ``VACC_HUB_RETRIES`` times (default 4,
  waits of 1, 2, 4, 8 s, or what ``Retry-After`` asks); files already complete are not fetched again;
- each file's bytes are checked against the hub's hash of them, its ETag (the sha256 of an LFS file, the git
  blob sha1 of the others): the client checks sizes only, so a file altered in transit or on disk would be used
  and kept; one that does not match is removed from the cache and refused;
- errors become one line that names the repo, revision or file and says what to do.
"""

import contextlib
import hashlib
import logging
import os
import re
import time
from pathlib import Path

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import sha256_file

LOG = logging.getLogger(__name__)
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
FIRST_WAIT_S, MAX_WAIT_S = 1.0, 8.0
SHA256 = re.compile(r"[0-9a-f]{64}")
GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
TOKEN_HELP = "log in with `hf auth login` or set HF_TOKEN to a token of an account that has access"


def hub_token():
    """HF_TOKEN when set: private and gated repos. It is passed to the hub client, never written anywhere."""
    return os.environ.get("HF_TOKEN") or None


def retries():
    value = os.environ.get("VACC_HUB_RETRIES", "4")
    if not value.isdigit():
        raise InputError(f"VACC_HUB_RETRIES = {value!r}: give a whole number of retries (0 for none)")
    return int(value)


def offline():
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def endpoint():
    from huggingface_hub import constants

    return constants.ENDPOINT


def transient_cause(error):
    """The transport failure or 408/429/5xx answer behind ``error`` (the client wraps them in its "not in the
    local cache" errors), or None when ``error`` is not worth another try."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    while error is not None:
        if isinstance(error, httpx2.TransportError):
            return error
        if isinstance(error, HfHubHTTPError) and error.response.status_code in TRANSIENT_STATUS:
            return error
        error = error.__cause__
    return None


def describe(error):
    """``ConnectError: [Errno -2] Name or service not known``, or ``503 Server Error`` for an answer."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return f"HTTP {error.response.status_code} from {error.response.url}"
    return f"{error.__class__.__name__}: {error}"


def retry_after(error):
    """The seconds a 429 or 503 answer's ``Retry-After`` header asks to wait, or None."""
    response = getattr(error, "response", None)
    value = response.headers.get("Retry-After", "") if response is not None else ""
    return float(value) if value.isdigit() else None


def with_retries(call, what):
    """``call()``, tried again after a transient failure (:func:`transient_cause`), with exponential backoff."""
    wait, attempts = FIRST_WAIT_S, retries()
    for attempt in range(1, attempts + 2):
        try:
            return call()
        except Exception as error:
            cause = transient_cause(error)
            if cause is None or attempt > attempts:
                raise
            delay = retry_after(cause) or wait
            LOG.warning("%s: %s; trying again in %.0f s (%d/%d)", what, describe(cause), delay, attempt, attempts)
            time.sleep(delay)
            wait = min(MAX_WAIT_S, wait * 2)


def bound_unlimited_timeouts():
    """Make the client's shared HTTP session give every request sent without a timeout one of
    ``HF_HUB_ETAG_TIMEOUT`` seconds (the client's own timeout for metadata requests).

    The session is rebuilt by the client after a connection error, so the hook goes in through the factory it
    rebuilds from; the factory copies the default session's own hooks (offline mode, request ids) and
    redirect setting rather than naming the client's private functions."""
    import httpx2
    from huggingface_hub import constants, get_session, set_client_factory

    template = get_session()
    if getattr(template, "bounds_timeouts", False):
        return
    hooks, redirects = list(template.event_hooks["request"]), template.follow_redirects
    bound = httpx2.Timeout(constants.HF_HUB_ETAG_TIMEOUT).as_dict()

    def add_timeout(request):
        if not any(request.extensions.get("timeout", {}).values()):
            request.extensions["timeout"] = bound

    def client():
        session = httpx2.Client(
            event_hooks={"request": [*hooks, add_timeout]}, follow_redirects=redirects, timeout=None
        )
        session.bounds_timeouts = True
        return session

    set_client_factory(client)


def token_state(token):
    return "with no token set" if token is None else "with a token (HF_TOKEN or `hf auth login`) that has no access"


@contextlib.contextmanager
def hub_errors(repo, revision, what, fix, repo_type="model"):
    """Turn the hub client's errors about ``what`` (repo ``repo`` of ``repo_type`` at ``revision``) into one-line
    input errors that say what to ``fix``."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    try:
        yield
    except GatedRepoError as error:
        raise InputError(
            f"{what}: the repo is gated and the hub refused access (HTTP {error.response.status_code}) "
            f"{token_state(hub_token())}: accept its terms on {repo_page(repo, repo_type)} with your account, then "
            f"{TOKEN_HELP}"
        ) from None
    except RevisionNotFoundError as error:
        raise InputError(
            f"{what}: the repo has no revision {revision} (HTTP {error.response.status_code}); fix {fix}"
        ) from None
    except RemoteEntryNotFoundError as error:
        raise InputError(
            f"{what}: the hub lists a file it does not serve (HTTP {error.response.status_code} for "
            f"{error.response.url}); try again later or fix {fix}"
        ) from None
    except RepositoryNotFoundError as error:
        raise InputError(
            f"{what}: no such repo at {endpoint()} (HTTP {error.response.status_code}), or it is private and "
            f"was asked for {token_state(hub_token())}: fix {fix}, or {TOKEN_HELP}"
        ) from None
    except (LocalEntryNotFoundError, RevisionResolutionError) as error:
        cause = transient_cause(error)
        if cause is None or offline():
            suffix = " with HF_HUB_OFFLINE=1" if offline() else ""
            raise InputError(
                f"{what} is not in the local hub cache{suffix} ({error.__class__.__name__}); "
                f"fetch it online first or fix {fix}"
            ) from None
        raise unreachable(what, cause) from None
    except HfHubHTTPError as error:
        if transient_cause(error):
            raise unreachable(what, error) from None
        raise InputError(f"cannot fetch {what}: {str(error).splitlines()[0]}") from None
    except Exception as error:
        if transient_cause(error) is None:
            raise
        raise unreachable(what, error) from None


def repo_page(repo, repo_type):
    return f"{endpoint()}/{'datasets/' if repo_type == 'dataset' else ''}{repo}"


def unreachable(what, cause):
    return InputError(
        f"{what}: the hub at {endpoint()} could not be reached ({describe(transient_cause(cause))}) after "
        f"{retries()} retries, and the local hub cache has no copy: check the network, HF_ENDPOINT and any proxy "
        "(HTTPS_PROXY), or set VACC_HUB_RETRIES higher for a flaky link"
    )


def git_blob_sha1(path):
    digest = hashlib.sha1(f"blob {Path(path).stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_blob(snapshot, name, what):
    """Refuse a file of ``snapshot`` whose bytes are not those its cache blob is named after (its ETag), and
    remove it from the cache so that the next run fetches it again."""
    link = Path(snapshot) / name
    blob = link.resolve()
    expected = blob.name
    if SHA256.fullmatch(expected):
        actual, kind = sha256_file(blob), "sha256"
    elif GIT_SHA1.fullmatch(expected):
        actual, kind = git_blob_sha1(blob), "git blob sha1"
    else:
        return  # a cache laid out by hand: nothing to check against
    if actual != expected:
        blob.unlink(missing_ok=True)
        link.unlink(missing_ok=True)
        raise InputError(
            f"{what}: {name} arrived with {kind} {actual}, but the hub gives {expected}: refused and removed "
            "from the hub cache; run again to fetch it anew (if it recurs, what serves HF_ENDPOINT alters files)"
        )


def hub_snapshot(repo, revision, patterns, what, fix, repo_type="model"):
    """``(folder, commit)``: the snapshot folder in the hub cache of the files of hub repo ``repo`` at ``revision``
    that match ``patterns``, each checked against the hub's hash (:func:`check_blob`), and the commit the revision
    resolved to, as the hub answered it (offline: the cache's ``refs/``). Errors name ``what`` and the setting to
    ``fix`` (:func:`hub_errors`)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    token = hub_token()
    bound_unlimited_timeouts()
    with hub_errors(repo, revision, what, fix, repo_type):
        # resolved once, so the files and the recorded commit are the same commit whatever the branch does meanwhile
        resolved = with_retries(
            lambda: HfApi(token=token).resolve_revision(repo, repo_type=repo_type, revision=revision), what
        )
        folder = with_retries(
            lambda: snapshot_download(
                repo, repo_type=repo_type, revision=resolved, allow_patterns=patterns, token=token
            ),
            what,
        )
    names = [path.relative_to(folder).as_posix() for path in Path(folder).rglob("*") if path.is_file()]
    for name in sorted(filter_repo_objects(names, allow_patterns=patterns)):
        check_blob(folder, name, f"{what} (commit {resolved.resolved})")
    return Path(folder), resolved.resolved
