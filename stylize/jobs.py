"""From the command line's paths to a list of clips and the file each one is written to.

Inputs: video files; folders of numbered images (DAVIS layout: one clip each); folders of videos
(each video one clip, `recursive` to descend). Output: `<stem>_<tag>.mp4` beside the input, or
under an output folder, or an explicit file for a single clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .formats import IMAGE_SUFFIXES, VIDEO_SUFFIXES


@dataclass(frozen=True)
class Job:
    src: Path
    dst: Path


def is_image_folder(folder: Path) -> bool:
    """A folder whose files are images and holds no videos is one clip of numbered frames."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return bool(files) and any(p.suffix.lower() in IMAGE_SUFFIXES for p in files) and not any(
        p.suffix.lower() in VIDEO_SUFFIXES for p in files
    )


def _is_our_output(path: Path, tag: str) -> bool:
    """Skip files this naming rule produced (so re-running over a folder never restyles outputs)
    and our hidden partial files."""
    return path.name.startswith(".") or path.stem.endswith(f"_{tag}")


def _clips_in(folder: Path, tag: str, recursive: bool) -> list[tuple[Path, Path]]:
    """(clip, its path relative to `folder`) for the videos and image-folder clips in `folder`."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and not _is_our_output(p, tag):
            found.append((p, p.relative_to(folder)))
        elif p.is_dir() and recursive and not p.name.startswith("."):
            if is_image_folder(p):
                found.append((p, p.relative_to(folder)))
            else:
                found += [(c, p.name / rel) for c, rel in _clips_in(p, tag, recursive)]
    return found


def plan_jobs(inputs: list[Path], tag: str, output: Path | None = None, recursive: bool = False) -> list[Job]:
    """Expand `inputs` into jobs. `tag` is the style name or the prompt's slug.

    `output` is a folder when it exists as one, ends with a path separator, or more than one clip
    is given (created if missing); otherwise the file for the single clip."""
    clips: list[tuple[Path, Path, Path]] = []  # (clip, default output folder, name relative to -o DIR)
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder; check the path")
        if path.is_file() or is_image_folder(path):
            clips.append((path, path.parent, Path(path.name)))
        else:
            found = _clips_in(path, tag, recursive)
            if not found:
                hint = "" if recursive else " (use --recursive to look in subfolders)"
                raise UsageError(f"{path}: no videos or numbered images found{hint}")
            clips += [(c, c.parent, rel) for c, rel in found]

    out_is_dir = output is not None and (
        output.is_dir() or str(output).endswith(("/", "\\")) or len(clips) > 1 or output.suffix == ""
    )
    if output is not None and not out_is_dir and output.suffix.lower() not in (".mp4", ".m4v"):
        raise UsageError(f"{output}: the output file must end in .mp4")
    jobs = []
    for clip, beside, rel in clips:
        name = f"{_stem(clip)}_{tag}.mp4"
        if output is None:
            dst = beside / name
        elif out_is_dir:
            dst = output / rel.parent / name  # a folder's clips keep their subfolders under -o DIR
        else:
            dst = output
        jobs.append(Job(clip, dst))
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.dst.resolve() == job.src.resolve():
            raise UsageError(f"{job.src}: the output would be the input itself; choose another -o")
        key = job.dst.resolve()
        if key in seen:
            raise UsageError(f"{seen[key]} and {job.src} would both be written to {job.dst}; use separate runs or -o DIR")
        seen[key] = job.src
    return jobs


def _stem(clip: Path) -> str:
    return clip.name if clip.is_dir() else clip.stem
