"""The Hugging Face Hub: whether a hub name may be fetched (and why not), and ``--push-to-hub``.

**Access.** The environment decides (DESIGN.md: no network unless asked): ``HF_HUB_OFFLINE`` set to
a true value (1/true/yes/on, as huggingface_hub reads it) means the local HF cache only; unset or
false means the hub is used. safealign never sets the variable itself (tests and the Makefile do).
Online, one short request to the hub endpoint comes first: an unreachable hub is bad input at
once (exit 2, a few seconds at most) instead of huggingface_hub's retry loop around every file.
Offline, a model that is not in the local cache is refused before transformers looks for it.

**Push** (huggingface_hub's HfApi), in an order that can neither waste a run nor lose one:

1. :func:`check_settings`, before the stage reads or writes anything: the hub is not switched off
   (``HF_HUB_OFFLINE``), there is a token (``HF_TOKEN`` or ``hf auth login``, as huggingface_hub
   finds it), the hub accepts it (``whoami``: a bad token fails now, not after hours of training),
   and the repository id is valid. Any failure is bad input (exit 2) and nothing runs.
2. The stage runs; only if it returns (for ``safety-test``: PASS) and its checks passed (the
   reload check of the saved model) does :func:`push_result` upload: ``create_repo`` (exist_ok)
   and one ``upload_folder`` commit. Training stages upload their output directory without
   ``checkpoints/``; ``safety-test`` uploads ``release/`` (the model with its safety card).
3. A failed upload never touches the local result. A refusal the user can fix (token without
   write access, a repository id the hub rejects, a missing organisation) is exit 2, anything else
   (network, server) exit 1; both say where the result is and how to upload it later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safealign.errors import BadInput, PushFailed

PROBE_TIMEOUT_S = 4.0
IGNORE = ["checkpoints/*", ".tmp*", "*/.tmp*", "*.lock"]
_TRUE = {"1", "true", "yes", "on"}
_probed: dict[str, str | None] = {}


# --------------------------------------------------------------------------------------------
# Access


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


# --------------------------------------------------------------------------------------------
# Push


def repo_id_for(cfg, user: str | None = None) -> str:
    """``--hub-model-id`` (NAME or ORG/NAME), else the output directory's name; NAME goes under ``user``."""
    name = cfg.hub_model_id or Path(cfg.output_dir).resolve().name
    return f"{user}/{name}" if user and "/" not in name else name


def check_settings(cfg) -> str | None:
    """Refuse (BadInput, exit 2) a --push-to-hub that cannot succeed; returns the repository id."""
    if not getattr(cfg, "push_to_hub", False):
        return None
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    later = "or drop --push-to-hub and upload the result later with `hf upload REPO DIR`"
    if getattr(cfg, "costs_file", None):
        raise BadInput("--push-to-hub uploads release/, and a --costs-file re-decision never writes one",
                       fix="push from a safety test that sampled the policy")
    if offline():
        raise BadInput("--push-to-hub needs the hub, and HF_HUB_OFFLINE is set", fix=f"unset HF_HUB_OFFLINE, {later}")
    if not get_token():
        raise BadInput("--push-to-hub needs a Hugging Face token, and none was found", fix=f"set HF_TOKEN or run `hf auth login`, {later}")
    try:
        validate_repo_id(repo_id_for(cfg))
    except HFValidationError as e:
        raise BadInput(f"--hub-model-id {repo_id_for(cfg)!r} is not a valid repository id ({str(e).splitlines()[0]})",
                       fix="use NAME or ORG/NAME (letters, digits, '-', '_', '.')") from None
    try:
        user = HfApi().whoami()["name"]
    except Exception as e:  # noqa: BLE001 - every failure here means: the push would fail
        raise BadInput(f"the hub did not accept the token ({_why(e)})", where=os.environ.get("HF_ENDPOINT", "huggingface.co"),
                       fix=f"check HF_TOKEN (a token with write access) and the network, {later}") from None
    return repo_id_for(cfg, user)


def _why(e: Exception) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    first = (str(e).splitlines() or [""])[0][:200]
    return f"{type(e).__name__}{f' {status}' if status else ''}: {first}"


def push_result(cfg, summary: dict, stage: str) -> dict | None:
    """Upload a successful stage's result (see the module docstring). Main process only: other
    processes of a distributed run return an empty summary and push nothing."""
    if not getattr(cfg, "push_to_hub", False) or not summary:
        return None
    folder = summary.get("release") if stage == "safety-test" else summary.get("output_dir")
    if not folder or not Path(folder).is_dir():
        raise PushFailed(f"nothing to push: {stage} left no {'release/' if stage == 'safety-test' else 'output directory'}")
    folder = Path(folder)
    check = summary.get("reload_check") or {}
    if check.get("ok") is False:
        raise PushFailed(f"not pushed: the saved model failed its reload check ({json.dumps(check)[:300]}); the result is in {folder}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    from safealign.runtime import model_card

    api = HfApi()
    repo = repo_id_for(cfg)  # NAME alone: create_repo puts it under the token's user and says where
    card = folder / "README.md"
    card_text = card.read_text() if card.is_file() else None
    try:
        url = api.create_repo(repo, private=True if cfg.hub_private else None, exist_ok=True)
        repo = getattr(url, "repo_id", None) or repo
        model_card.set_model_id(folder, repo)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=f"safealign {stage}: {summary.get('headline', '')}"[:200],
                                 ignore_patterns=IGNORE)
    except (HFValidationError, HfHubHTTPError) as e:
        if card_text is not None:
            card.write_text(card_text)
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, HFValidationError) or status in (400, 401, 403, 404, 409):
            raise BadInput(f"the hub refused the push to {repo!r} ({_why(e)}); {_later(repo, folder)}",
                           fix="check that the token has write access to that repository (or organisation) and the --hub-model-id") from None
        raise PushFailed(f"pushing to {repo!r} failed ({_why(e)}); {_later(repo, folder)}") from None
    except Exception as e:  # noqa: BLE001 - network and the like: say so, keep the result
        if card_text is not None:
            card.write_text(card_text)
        raise PushFailed(f"pushing to {repo!r} failed ({_why(e)}); {_later(repo, folder)}") from None
    pushed = {"repo_id": repo, "url": str(url), "commit": getattr(info, "oid", None), "folder": str(folder), "private": bool(cfg.hub_private)}
    _record(folder if stage != "safety-test" else Path(summary["output_dir"]), pushed)
    summary["hub"] = pushed
    return pushed


def _later(repo: str, folder: Path) -> str:
    return f"the result is kept in {folder}; upload it later with `hf upload {repo} {folder}`"


def _record(run_dir: Path, pushed: dict) -> None:
    from safealign.runtime.io import atomic_write_json

    rep = run_dir / "report.json"
    if rep.is_file():
        data = json.loads(rep.read_text())
        data["hub"] = pushed
        atomic_write_json(rep, data)
