"""File suffixes stylize reads, defined once (jobs.py plans clips with them, video.py reads them).

Light on purpose: the CLI plans its jobs before any heavy import.
"""

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".wmv", ".flv", ".gif"}
)
# still images, read with Pillow (a folder of them is one clip of numbered frames)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
