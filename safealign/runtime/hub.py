"""Hub access: the one place that decides whether a hub name may be fetched, and says why not.

The environment decides (DESIGN.md: no network unless asked): ``HF_HUB_OFFLINE`` set to a true
value (1/true/yes/on, as huggingface_hub reads it) means the local HF cache only; unset or false
means the hub is used. safealign never sets the variable itself (tests and the Makefile do).

Online, one short request to the hub endpoint comes first: an unreachable hub is bad input at
once (exit 2, a few seconds at most) instead of huggingface_hub's retry loop around every file.
Offline, a model that is not in the local cache is refused before transformers looks for it.
"""

from __future__ import annotations

import os

from safealign.errors import BadInput

PROBE_TIMEOUT_S = 4.0
_TRUE = {"1", "true", "yes", "on"}
_probed: dict[str, str | None] = {}


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``url`` answers at all (any HTTP status), else why not (one line)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"{type(reason).__name__}: {reason}"
    return None


def require(name: str, what: str, *, kind: str = "model", revision: str | None = None) -> None:
    """Make sure hub name ``name`` (a ``what`` such as "model" or "data") can be fetched, or raise BadInput.

    kind: "model" (checked in the local cache when offline) or "dataset" (the datasets library keeps
    its own cache: offline, its load is tried and its failure reported by :func:`load_error`)."""
    if offline():
        if kind == "model" and not in_cache(name, revision):
            raise BadInput(f"{what} '{name}' is not a local path and not in the local HF cache, and the hub is offline "
                           f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')})",
                           fix="unset HF_HUB_OFFLINE (or set it to 0) to download it, or pass a local directory")
        return
    url = endpoint()
    if url not in _probed:
        _probed[url] = probe(url)
    if _probed[url]:
        raise BadInput(f"{what} '{name}' is not a local path, and the hub ({url}) is unreachable ({_probed[url]})",
                       fix="check the network (or HF_ENDPOINT), download it and pass a local path, or set HF_HUB_OFFLINE=1 "
                           "to use what the local HF cache holds")


def in_cache(name: str, revision: str | None = None) -> bool:
    """True when the local HF cache holds a config of hub model ``name`` (at ``revision``)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("config.json", "tokenizer_config.json", "adapter_config.json"):
        try:
            found = try_to_load_from_cache(name, filename, revision=revision)
        except Exception:  # an invalid repo id or revision: not cached
            return False
        if isinstance(found, str):
            return True
    return False


def load_error(e: Exception, name: str, what: str) -> BadInput:
    """A hub load that failed, as one paragraph naming the source and the likely fix."""
    kind = type(e).__name__
    first = str(e).splitlines()[0] if str(e) else ""
    if kind in ("RepositoryNotFoundError", "DatasetNotFoundError"):
        fix = "check the name (org/name) and, for a private or gated repository, log in (hf auth login)"
    elif kind == "GatedRepoError":
        fix = "accept the repository's terms on the hub and log in (hf auth login)"
    elif kind == "RevisionNotFoundError":
        fix = "check --revision / --data-revision (a branch, tag or commit of that repository)"
    elif offline():
        fix = "unset HF_HUB_OFFLINE to download it, or pass a local path"
    else:
        fix = "check the name and the revision, or download it and pass a local path"
    return BadInput(f"cannot load {what} from the hub ({kind}: {first})", where=name, fix=fix)
