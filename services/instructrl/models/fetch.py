"""`instructrl fetch-models`: download Hugging Face model repos at pinned revisions into a
models volume, once (the Helm chart's init container with `models.source: hf`).

Each repo lands in the Hub cache (`cache_dir`, default huggingface_hub's: $HF_HUB_CACHE or
$HF_HOME/hub) with huggingface_hub's `snapshot_download`, and `<dest>/<name>` becomes a
relative symlink to its snapshot, so the roles read `<dest>/<name>` as a plain HF directory.
A marker `<dest>/.instructrl-fetch/<name>.json` records what was fetched: a second start of
the pod (or of another pod sharing the volume) with the same repo and revision touches neither
the network nor the cache. Revisions must be commit hashes, so every pod loads the same
weights. The token comes from $HF_TOKEN (huggingface_hub reads it); HF_HUB_OFFLINE=1 fetches
from the cache only.

    instructrl fetch-models dest=/models \\
        'repos=[{repo: org/sft-model, revision: 0123...cdef, name: sft}]'
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import sys

from instructrl.config import ConfigError, field, parse_cli

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
MARKERS = ".instructrl-fetch"


@dataclasses.dataclass
class RepoSpec:
    repo: str = field(help="Hub repo id, e.g. meta-llama/Llama-3.1-8B-Instruct")
    revision: str = field(help="the commit hash (40 hex characters) to download")
    name: str = field(help="directory under `dest` the roles read it from, e.g. sft")
    allow_patterns: list[str] = field(default_factory=list, help="only files matching these globs (empty = all)")


@dataclasses.dataclass
class FetchConfig:
    dest: str = field("/models", help="the models volume: `<dest>/<name>` links to each repo's snapshot")
    cache_dir: str = field("", help="Hub cache directory (empty = $HF_HUB_CACHE, else $HF_HOME/hub)")
    endpoint: str = field("", help="Hub endpoint, e.g. a mirror (empty = $HF_ENDPOINT, else huggingface.co)")
    repos: list[RepoSpec] = field(default_factory=list, help="what to download: [{repo, revision, name}, ...]")

    def validate(self) -> None:
        if not self.repos:
            raise ConfigError("repos: at least one {repo, revision, name} is required")
        names = set()
        for i, r in enumerate(self.repos):
            where = f"repos[{i}]"
            if not _REPO.match(r.repo):
                raise ConfigError(f"{where}.repo: {r.repo!r} is not a Hub repo id (owner/name)")
            if not _COMMIT.match(r.revision):
                raise ConfigError(
                    f"{where}.revision: {r.revision!r} is not a commit hash; pin {r.repo} to a 40-character "
                    "commit (the repo's commit history on the Hub lists them) so every pod loads the same weights")
            if not _NAME.match(r.name) or r.name in names:
                raise ConfigError(f"{where}.name: {r.name!r} must be a unique plain directory name")
            names.add(r.name)


def _marker(cfg: FetchConfig, spec: RepoSpec) -> pathlib.Path:
    return pathlib.Path(cfg.dest) / MARKERS / f"{spec.name}.json"


def already_fetched(cfg: FetchConfig, spec: RepoSpec) -> bool:
    """The marker names this repo and revision, and `<dest>/<name>` is a readable directory."""
    marker = _marker(cfg, spec)
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    link = pathlib.Path(cfg.dest) / spec.name
    return done.get("repo") == spec.repo and done.get("revision") == spec.revision and link.is_dir()


def _link(dest: pathlib.Path, name: str, snapshot: pathlib.Path) -> pathlib.Path:
    """Point `dest/name` at `snapshot` (relative, so any pod mounting the volume anywhere
    resolves it), replacing an older link atomically; never a real directory."""
    link = dest / name
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not a link made by fetch-models; remove it or pick another name")
    tmp = dest / f".{name}.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(snapshot, dest))
    os.replace(tmp, link)
    return link


def fetch(cfg: FetchConfig, spec: RepoSpec) -> pathlib.Path:
    """Download (or find in the cache) one repo at its revision and link it as `<dest>/<name>`."""
    from huggingface_hub import snapshot_download

    snapshot = snapshot_download(spec.repo, revision=spec.revision, cache_dir=cfg.cache_dir or None,
                                 endpoint=cfg.endpoint or None, allow_patterns=spec.allow_patterns or None)
    dest = pathlib.Path(cfg.dest)
    link = _link(dest, spec.name, pathlib.Path(snapshot))
    marker = _marker(cfg, spec)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"repo": spec.repo, "revision": spec.revision, "snapshot": str(snapshot)}) + "\n")
    os.replace(tmp, marker)
    return link


def main(argv: list[str]) -> int:
    cfg = parse_cli("instructrl fetch-models", FetchConfig, argv, __doc__.splitlines()[0],
                    "dest=/models 'repos=[{repo: org/name, revision: <commit>, name: sft}]'")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pathlib.Path(cfg.dest).mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(cfg.repos):
        what = f"repos[{i}] ({spec.repo}@{spec.revision[:12]})"
        if already_fetched(cfg, spec):
            log.info("%s: already in %s/%s, nothing to do", what, cfg.dest, spec.name)
            continue
        try:
            link = fetch(cfg, spec)
        except Exception as e:  # noqa: BLE001 - one line naming the repo, not a traceback
            print(f"instructrl fetch-models: {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr)
            return 1
        log.info("%s: %s -> %s", what, link, os.readlink(link))
    return 0
