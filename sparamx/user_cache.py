"""The CLI's state between commands: where the last artifact `sparamx prune` wrote is, and the user cache that holds
that pointer and the dense models' eval results."""

from pathlib import Path

from .pipeline.artifact_writer import write_text_atomic
from .pipeline.errors import ArtifactError
from .pipeline.gguf_cache import cache_dir


def remember_artifact(path: str | Path) -> None:
    """Record the artifact `sparamx prune` wrote last (`sparamx eval` with no PATH evaluates it)."""
    write_text_atomic(cache_dir() / "last-artifact", str(Path(path).resolve()) + "\n")


def last_artifact() -> Path:
    file = cache_dir() / "last-artifact"
    if not file.is_file():
        raise ArtifactError("no artifact given and none made yet: run `make prune` first or pass an artifact directory")
    return Path(file.read_text().strip())
