"""From the command line's paths to a list of jobs and the file each one is written to.

Inputs: video files; still images (each written as an image, stills.py); folders of numbered
images (DAVIS layout: one clip each, or with `stills` each image its own still); folders of videos
(each video one clip, `recursive` to descend). Output: `<stem>_<tag>.mp4` (a still:
`<stem>_<tag><its suffix>`) beside the input, or under an output folder, or an explicit file for a
single job. Every path problem is a UsageError raised here, before anything is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .formats import IMAGE_SUFFIXES, VIDEO_SUFFIXES


@dataclass(frozen=True)
class Job:
    src: Path
    dst: Path
    still: bool = False  # a still image, written as an image in its own format


# suffixes that name the same format: an explicit `-o` for a still may use either spelling
_SAME_FORMAT = {".jpeg": ".jpg", ".tiff": ".tif"}


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


def _is_still(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _clips_in(folder: Path, tag: str, recursive: bool, stills: bool) -> list[tuple[Path, Path]]:
    """(clip, its path relative to `folder`) for the videos and image-folder clips in `folder`;
    with `stills`, its images too (each a still) and image folders are descended like any other."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix.lower() in VIDEO_SUFFIXES or (stills and _is_still(p))):
            if not _is_our_output(p, tag):
                found.append((p, p.relative_to(folder)))
        elif p.is_dir() and recursive and not p.name.startswith("."):
            if is_image_folder(p) and not stills:
                found.append((p, p.relative_to(folder)))
            else:
                found += [(c, p.name / rel) for c, rel in _clips_in(p, tag, recursive, stills)]
    return found


def plan_jobs(inputs: list[Path], tag: str, output: str | os.PathLike | None = None, recursive: bool = False,
              stills: bool = False) -> list[Job]:  # fmt: skip
    """Expand `inputs` into jobs. `tag` is the style name or the prompt's slug; `stills` takes
    each image in a folder as its own still instead of the folder as one clip.

    `output` is a folder when it exists as one, ends with a path separator or has no suffix
    (created when the first output is written); otherwise the file for the single job. Several
    jobs with an output that names a video or image file are a UsageError (nothing is created)."""
    clips: list[tuple[Path, Path, Path]] = []  # (clip, default output folder, name relative to -o DIR)
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder; check the path")
        if path.is_file() or (is_image_folder(path) and not stills):
            clips.append((path, path.parent, Path(path.name)))
        else:
            found = _clips_in(path, tag, recursive, stills)
            if not found:
                hint = "" if recursive else " (use --recursive to look in subfolders)"
                what = "videos or images" if stills else "videos or numbered images"
                raise UsageError(f"{path}: no {what} found{hint}")
            clips += [(c, c.parent, rel) for c, rel in found]

    trailing_sep = output is not None and os.fspath(output).endswith(("/", os.sep))  # a Path drops it
    output = None if output is None else Path(output)
    out_is_dir = output is not None and (trailing_sep or _names_folder(output, len(clips)))
    jobs = []
    for clip, beside, rel in clips:
        still = _is_still(clip)
        name = f"{_stem(clip)}_{tag}{clip.suffix if still else '.mp4'}"
        if output is None:
            dst = beside / name
        elif out_is_dir:
            dst = output / rel.parent / name  # a folder's clips keep their subfolders under -o DIR
        else:
            dst = _output_file(output, clip, still)
        jobs.append(Job(clip, dst, still))
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.dst.resolve() == job.src.resolve():
            raise UsageError(f"{job.src}: the output would be the input itself; choose another -o")
        key = job.dst.resolve()
        if key in seen:
            raise UsageError(f"{seen[key]} and {job.src} would both be written to {job.dst}; use separate runs or -o DIR")
        seen[key] = job.src
    return jobs


def _names_folder(output: Path, jobs: int) -> bool:
    """Whether `-o output` is a folder; a file named for several jobs is refused."""
    if output.is_dir() or output.suffix == "":
        return True
    if jobs == 1:
        return False
    if output.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES:
        raise UsageError(
            f"-o {output}: one file cannot hold {jobs} outputs; give a folder (-o DIR/), or one input per run"
        )
    return True  # e.g. -o results.v2: a folder with a dot in its name, as it always was


def _output_file(output: Path, clip: Path, still: bool) -> Path:
    """The explicit output file of a single job, checked to be of the kind it will hold."""
    suffix = output.suffix.lower()
    if still:
        if _SAME_FORMAT.get(suffix, suffix) != _SAME_FORMAT.get(clip.suffix.lower(), clip.suffix.lower()):
            raise UsageError(f"{output}: a still is written in its own format; give a name ending in {clip.suffix}")
    elif suffix not in (".mp4", ".m4v"):
        raise UsageError(f"{output}: the output file must end in .mp4")
    return output


def _stem(clip: Path) -> str:
    return clip.name if clip.is_dir() else clip.stem
