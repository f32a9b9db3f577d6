"""The Hugging Face Hub: model ids resolved to snapshots in the Hugging Face cache, fetching only the files a stage
loads, and the upload of a fine-tuned pipeline folder."""

from pathlib import Path

from t2i.core.cli import first_line

# Training leftovers that do not belong in a published model repo.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", ".*"]
# A component folder's weight files: only the ones t2i's loaders pick (models.weight_files) are fetched.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb")


def is_hub_id(name) -> bool:
    """Whether `name` names no local path and is spelt as a Hub repo id (`org/name` or `name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).exists():
        return False
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return False
    return True


def resolve_model(name, flag="--pretrained_model_name_or_path", components=None, revision=None, variant=None,
                  cache_dir=None) -> Path:
    """The diffusers folder `name`, or the snapshot of the Hub model `name` in the Hugging Face cache.

    A snapshot holds model_index.json and, for `components` (default: every component the index names), each
    folder's configs and tokenizer files and the weights t2i's loaders pick for `variant`. Online, the files the cache
    lacks are downloaded (HF_HOME, HF_HUB_CACHE or `cache_dir`); offline (HF_HUB_OFFLINE=1, no network) the cached
    snapshot is used. It prints what it fetched or used; anything else is a one-line ValueError.
    """
    from t2i.interop import models

    if not is_hub_id(name):
        return models.check_model_dir(name, flag)
    info, offline = _model_info(name, flag, revision)
    if info is None:
        folder = _cached_snapshot(name, flag, components, revision, variant, cache_dir, offline)
    else:
        folder = _download(name, flag, info, components, revision, variant, cache_dir)
    return models.check_model_dir(folder, flag)


def _repo_cache(repo_id, cache_dir) -> Path:
    """Where huggingface_hub caches the model repo: <cache>/models--org--name."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _model_info(repo_id, flag, revision):
    """(the Hub's ModelInfo, None) online; (None, why) when the Hub cannot be reached."""
    import requests
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return HfApi().model_info(repo_id, revision=revision), None
    except OfflineModeIsEnabled:
        return None, "HF_HUB_OFFLINE=1"
    except (requests.ConnectionError, requests.Timeout) as e:
        return None, f"no network: {type(e).__name__} from {constants.ENDPOINT}"
    except GatedRepoError:
        raise ValueError(f"{flag}: {repo_id} is a gated model: accept its terms at https://huggingface.co/{repo_id} "
                         "and log in (`huggingface-cli login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{flag}: {repo_id} is neither a local folder nor a model on the Hub (if it is private, log "
                         "in with `huggingface-cli login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ValueError(f"--revision {revision}: {repo_id} has no such branch, tag or commit") from None
    except HfHubHTTPError as e:
        raise ValueError(f"{flag}: the Hub did not give {repo_id} ({first_line(e)})") from None


def _stage_files(folder: Path, components, variant, listing=None) -> list:
    """The files, relative to the snapshot `folder`, that loading `components` reads: every non-weight file of their
    folders and the weights models.weight_files picks. `listing` is the repo's file list (None: what is on disk)."""
    from t2i.interop import models

    if listing is None:
        listing = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    wanted = ["model_index.json"]
    for component in components:
        inside = [f for f in listing if f.startswith(f"{component}/")]
        if not inside:
            raise ValueError(f"no {component}/ folder")
        wanted += [f for f in inside if not f.endswith(WEIGHT_SUFFIXES)]
        if component in models.WEIGHT_NAMES:
            names = [f[len(component) + 1:] for f in inside]
            files = models.weight_files(folder / component, component, variant, listing=names)
            wanted += [str(f.relative_to(folder)) for f in files]
    return wanted


def _download(repo_id, flag, info, components, revision, variant, cache_dir) -> Path:
    """Fetch into the cache what the stage loads of `repo_id` at `info.sha` and is not there yet; the snapshot."""
    from huggingface_hub import snapshot_download

    from t2i.interop import models

    listing = [s.rfilename for s in info.siblings]
    if "model_index.json" not in listing:
        raise ValueError(f"{flag}: {repo_id} on the Hub is not a diffusers pipeline (no model_index.json)")

    def fetch(files):
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=files))
        except OSError as e:  # requests' and huggingface_hub's network and HTTP errors
            raise ValueError(f"{flag}: downloading {repo_id} failed ({first_line(e)}); run again to resume") from None

    # The configs first: they say which components there are and which weight files (shard indexes) to take.
    configs = ["model_index.json"] + [f for f in listing if "/" in f and not f.endswith(WEIGHT_SUFFIXES)
                                      and (components is None or f.split("/")[0] in components)]
    folder = _repo_cache(repo_id, cache_dir) / "snapshots" / info.sha
    cached = {f for f in listing if (folder / f).is_file()}
    folder = fetch(configs)
    components = models.present(folder, components) if components else models.pipeline_components(folder)
    try:
        wanted = _stage_files(folder, components, variant, listing)
    except ValueError as e:
        raise ValueError(f"{flag}: {repo_id}: {e}") from None
    fetch(wanted)
    fetched = [f for f in wanted if f not in cached]
    size = sum((folder / f).stat().st_size for f in fetched)
    what = f"fetched {len(fetched)} files ({size / 2**20:.1f} MiB: {', '.join(fetched)})" if fetched else "fetched none"
    print(f"{flag} {repo_id} (revision {revision or 'main'} = {info.sha[:12]}): {what}; "
          f"{len(wanted) - len(fetched)} already cached; using {folder}")
    return folder


def _cached_snapshot(repo_id, flag, components, revision, variant, cache_dir, offline) -> Path:
    """The Hub being out of reach, the cached snapshot of `repo_id`, if it holds what the stage loads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from t2i.interop import models

    at = f" at revision {revision}" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ValueError(f"{flag}: {repo_id}{at} is not in the Hugging Face cache {_repo_cache(repo_id, cache_dir)} "
                         f"and the Hub cannot be reached ({offline}); run once with network to download it, or pass "
                         "a local folder") from None
    try:
        models.check_model_dir(folder, flag)
        _stage_files(folder, models.present(folder, components) if components else models.pipeline_components(folder),
                     variant)
    except ValueError as e:
        raise ValueError(f"{flag}: the cached snapshot of {repo_id}{at} lacks files this command loads ({e}) and "
                         f"the Hub cannot be reached ({offline}); run once with network to fetch them") from None
    print(f"{flag} {repo_id}{at}: the Hub cannot be reached ({offline}); using the cached snapshot {folder}")
    return folder


def push_to_hub(folder, repo_id, token=None, private=False) -> str:
    """Create the model repo if needed and upload `folder` as one commit; returns the commit URL.

    Network and authentication failures become one ValueError line naming the repo and what to check.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--push_to_hub: {folder} is not a folder to upload")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message="Upload fine-tuned pipeline from t2i",
            ignore_patterns=IGNORE_PATTERNS,
        )
    except OSError as e:  # requests' connection and HTTP errors, huggingface_hub's auth errors are all OSErrors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"--push_to_hub: could not upload to {repo_id} ({reason}); check the network, the repo id "
            "--hub_model_id, and that --hub_token (or HF_TOKEN / `huggingface-cli login`) has write access"
        ) from None
    return commit.commit_url
