"""The fuzzer shared by tests/test_fuzz.py and scripts/fuzz.py: small real inputs, a seeded mutator
that knows their structure, and the judge of one case.

Inputs (`seed_inputs`): H.264 in MP4 four ways (index at the end, index in front with AAC,
rotated, fragmented with AAC), H.264 with PCM in Matroska, VP8 with Opus in WebM, a folder of
three JPEG frames (EXIF-rotated), and a still PNG with alpha and an EXIF orientation. Each holds 3
frames of 64x48, so a case that gets through costs one batch of the tiny stack.

The mutator is seeded per case (`random.Random(f"{seed}:{index}")`), so any case is rebuilt from
its seed and index alone. One kind per case, applied to one file of a pristine input:

- flip: 1-64 bytes XORed (a single bit half the time);
- truncate: the file cut short, at a random byte or at (or next to) a box/element boundary;
- splice: a byte range deleted, duplicated, zeroed or replaced by random bytes;
- size: the size of an MP4 box (moov, trak, stbl, stsz, stco, mdat, ... at any depth), a
  Matroska element (its size vint, same length), a PNG chunk or a JPEG segment, set to 0, 1, off
  by one, doubled, halved, huge or random;
- type: an MP4 box's four-character type, a Matroska element's ID (same length), a PNG chunk's
  type or a JPEG marker, swapped for another known one or random bytes;
- count: an MP4 table's entry count or one of its entries (stsz, stco, stts, stsc, stss, ctts,
  elst, stsd, dref, trun) set to an extreme value;
- header: a header field set to an extreme value: MP4 timescales and durations (mvhd, mdhd), the
  track's matrix and size (tkhd), the sample entry's size (avc1) and audio format (mp4a, esds),
  the handler type, the H.264 parameter sets (avcC), fragment headers (tfhd, tfdt, trex);
  Matroska's pixel sizes, timestamp scale, default duration, sampling rate, channels, codec id and
  private data, cluster timestamps and block headers; PNG's IHDR and EXIF bytes (CRC mended, so
  the reader gets past it); JPEG's frame header (size, components), tables and EXIF bytes;
- stack: two to four of the above but truncate, one after the other.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import random
import resource
import signal
import threading
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from stylize.errors import StylizeError
from tests.clips import make_clip, pattern

LIMIT_S = 10.0  # per case
RSS_LIMIT = 2 << 30  # bytes: the process's peak resident memory during a case
FRAMES = 3  # per input: each frame is stylized, so a case costs what its frames cost
BATCH_SIZE = 4  # one batch per input
EXIF_ORIENTATION = 0x0112

# ----------------------------------------------------------------------------- inputs


def muxed_clip(path: Path, video: str, audio: str, rate: int, options: dict | None = None) -> Path:
    """FRAMES frames of `pattern` at 64x48, 25 fps, with 0.12 s of a mono tone, muxed by the
    format the suffix names with its `options` (make_clip takes none)."""
    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream(video, rate=25, options={"preset": "ultrafast", "g": "2"} if video == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        sound = out.add_stream(audio, rate=rate, layout="mono")
        for index in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(pattern(index, 64, 48), format="rgb24").reformat(format="yuv420p")
            frame.pts = index
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        tone = (np.sin(np.arange(rate * 12 // 100) / 8) * 0.5).astype(np.float32)
        fmt, chunk = sound.codec_context.format.name, sound.codec_context.frame_size or 1024
        for first in range(0, len(tone), chunk):
            part = tone[None, first : first + chunk]
            part = (part * 32767).astype(np.int16) if fmt == "s16" else part
            frame = av.AudioFrame.from_ndarray(part, format=fmt, layout="mono")
            frame.sample_rate, frame.pts = rate, first
            out.mux(sound.encode(frame))
        out.mux(sound.encode())
    return path


def faststart(data: bytes) -> bytes:
    """An MP4 whose moov box follows its media data, with moov moved to the front (what
    `-movflags faststart` and streaming sites do): a cut file then keeps its index and loses frames."""
    level = mp4_boxes(data, deep=False)
    moov = next(b for b in level if b.tag == b"moov")
    assert level[0].tag == b"ftyp" and moov.at > next(b for b in level if b.tag == b"mdat").at
    out = bytearray(b"".join(data[b.at : b.end] for b in [level[0], moov, *(b for b in level[1:] if b is not moov)]))
    for box in mp4_boxes(bytes(out)):
        if box.tag == b"stco":  # chunk offsets: the media data moved on by moov's size
            for at in range(box.at + 16, box.end, 4):
                _put(out, at, 4, _get(out, at, 4) + moov.size)
    return bytes(out)


def _image(path: Path, index: int, orientation: int, alpha: bool = False) -> Path:
    rgb = Image.fromarray(pattern(index, 64, 48))
    if alpha:
        rgb.putalpha(Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    rgb.save(path, exif=exif, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return path


def seed_inputs(folder: Path) -> dict[str, dict[str, bytes]]:
    """Each input's files (path relative to `folder` -> bytes) by the input's name, as the CLI
    takes it: a video file, a folder of numbered frames (one clip), a still image."""
    folder.mkdir(parents=True, exist_ok=True)
    pts = [i * 40 for i in range(FRAMES)]
    aac = make_clip(folder / "aac.mp4", pts=pts, audio_codec="aac", audio_rate=8000, channels=1)
    aac.write_bytes(faststart(aac.read_bytes()))
    (folder / "frames").mkdir(exist_ok=True)
    files = [
        make_clip(folder / "plain.mp4", pts=pts),
        aac,
        make_clip(folder / "rotated.mp4", pts=pts, size=(64, 32), rotation=-90),
        muxed_clip(folder / "frag.mp4", "libx264", "aac", 8000, {"movflags": "frag_keyframe+empty_moov"}),
        make_clip(folder / "pcm.mkv", pts=pts, audio_codec="pcm_s16le", audio_rate=8000, channels=1),
        muxed_clip(folder / "vp8.webm", "libvpx", "libopus", 48000),
        *(_image(folder / "frames" / f"{i:05d}.jpg", i, orientation=3) for i in range(FRAMES)),
        _image(folder / "still.png", 0, orientation=6, alpha=True),
    ]
    inputs: dict[str, dict[str, bytes]] = {}
    for path in files:
        relative = path.relative_to(folder)
        inputs.setdefault(relative.parts[0], {})[relative.as_posix()] = path.read_bytes()
    return inputs


# ----------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Node:
    """An MP4 box, Matroska element, PNG chunk or JPEG segment: `at` its first byte, `head` the
    bytes before its data, `size` its whole length; `tag` its type (bytes) or Matroska ID (int,
    marker bits kept; `id_len` its length in bytes)."""

    tag: bytes | int
    at: int
    head: int
    size: int
    id_len: int = 0

    @property
    def data(self) -> int:
        return self.at + self.head

    @property
    def end(self) -> int:
        return self.at + self.size


# bytes of a box's own fields before its child boxes
_MP4_CHILDREN = {b"moov": 0, b"trak": 0, b"mdia": 0, b"minf": 0, b"stbl": 0, b"edts": 0, b"dinf": 0, b"udta": 0,
                 b"mvex": 0, b"moof": 0, b"traf": 0, b"mfra": 0, b"ilst": 0, b"meta": 4, b"stsd": 8, b"dref": 8,
                 b"avc1": 78, b"mp4a": 28}  # fmt: skip
# (offset from the box's start, entry size) of each table's entries; the count is at offset 12
_MP4_TABLES = {b"stsz": (20, 4), b"stco": (16, 4), b"co64": (16, 8), b"stts": (16, 8), b"stsc": (16, 12),
               b"stss": (16, 4), b"ctts": (16, 8), b"elst": (16, 12), b"stsd": (16, 0), b"dref": (16, 0),
               b"trun": (16, 4), b"tfra": (24, 4)}  # fmt: skip
# header fields (offset from the box's start, width in bytes), for version-0 boxes
_MP4_FIELDS = {
    b"mvhd": [(20, 4), (24, 4)],  # timescale, duration
    b"mdhd": [(20, 4), (24, 4), (28, 2)],  # timescale, duration, language
    b"tkhd": [(20, 4), (28, 4), *[(48 + 4 * i, 4) for i in range(9)], (84, 4), (88, 4)],  # id, duration, matrix, w, h
    b"avc1": [(32, 2), (34, 2), (48, 2), (82, 2)],  # width, height, frame count, depth
    b"avcC": [(9, 1), (11, 1), (12, 1), (13, 1), (14, 2), *[(16 + i, 1) for i in range(12)]],  # profile ... SPS
    b"mp4a": [(24, 2), (26, 2), (32, 4)],  # channels, sample size, sample rate (16.16)
    b"esds": [(8 + i, 1) for i in range(4, 40)],
    b"hdlr": [(16, 4)],  # handler type
    b"stsz": [(12, 4)],  # the one sample size for all (0: a table follows)
    b"tfhd": [(12, 4), (16, 4), (20, 4), (24, 4)],  # track id, then the defaults its flags announce
    b"tfdt": [(12, 4), (16, 4)],  # the fragment's decode time
    b"trex": [(12, 4), (16, 4), (20, 4), (24, 4), (28, 4)],  # track id, default sample description ...
    b"mfhd": [(12, 4)],  # sequence number
}
_MP4_NAMED = (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd", b"stsz", b"stco", b"stts", b"mdat", b"avc1",
              b"avcC", b"mp4a", b"esds", b"tkhd", b"mdhd", b"mvhd", b"hdlr", b"moof", b"traf", b"trun")  # fmt: skip

# Matroska master elements (their data is child elements) and value elements worth editing
_MKV_MASTERS = {0x1A45DFA3, 0x18538067, 0x114D9B74, 0x4DBB, 0x1549A966, 0x1654AE6B, 0xAE, 0xE0, 0xE1, 0x55B0,
                0x1F43B675, 0xA0, 0x1C53BB6B, 0xBB, 0xB7, 0x1254C367, 0x7373, 0x63C0, 0x67C8, 0x6D80, 0x6240}  # fmt: skip
_MKV_FIELDS = {0xB0: "PixelWidth", 0xBA: "PixelHeight", 0x54B0: "DisplayWidth", 0x54BA: "DisplayHeight",
               0x2AD7B1: "TimestampScale", 0x4489: "Duration", 0x23E383: "DefaultDuration",
               0xB5: "SamplingFrequency", 0x9F: "Channels", 0x6264: "BitDepth", 0x86: "CodecID",
               0x63A2: "CodecPrivate", 0xD7: "TrackNumber", 0x83: "TrackType", 0xE7: "Timestamp",
               0xA3: "SimpleBlock", 0xA1: "Block", 0x9B: "BlockDuration", 0x56AA: "CodecDelay",
               0x42F7: "EBMLReadVersion", 0x4282: "DocType", 0x4285: "DocTypeReadVersion",
               0x42F2: "EBMLMaxIDLength", 0x42F3: "EBMLMaxSizeLength", 0x53AC: "SeekPosition",
               0xF1: "CueClusterPosition", 0xB3: "CueTime", 0x9C: "FlagLacing"}  # fmt: skip

_PNG_TYPES = (b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"eXIf", b"iCCP", b"gAMA", b"sRGB", b"pHYs", b"tEXt",
              b"zTXt", b"acTL", b"fcTL", b"fdAT")  # fmt: skip
# IHDR: width, height, bit depth, colour type, compression, filter, interlace (offsets from the chunk's start)
_PNG_FIELDS = {b"IHDR": [(8, 4), (12, 4), (16, 1), (17, 1), (18, 1), (19, 1), (20, 1)]}
_JPEG_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xCC, 0xDA, 0xDB, 0xDD, 0xD8, 0xD9, 0xE0, 0xE1, 0xE2, 0xEE, 0xFE)
# SOF0/SOF2: precision, height, width, components and their (id, sampling, table); DRI: the interval
_JPEG_FIELDS = {0xC0: [(4, 1), (5, 2), (7, 2), (9, 1), *[(10 + i, 1) for i in range(9)]], 0xDD: [(4, 2)]}
_JPEG_FIELDS[0xC2] = _JPEG_FIELDS[0xC0]


def mp4_boxes(data: bytes, start: int = 0, end: int | None = None, deep: bool = True) -> list[Node]:
    """Every box in data[start:end], depth first (with `deep`, the children of the boxes in
    _MP4_CHILDREN too)."""
    end = len(data) if end is None else end
    boxes, at = [], start
    while at + 8 <= end:
        size, head = _get(data, at, 4), 8
        if size == 1 and at + 16 <= end:
            size, head = _get(data, at + 8, 8), 16
        elif size == 0:
            size = end - at
        if size < head or at + size > end:
            break
        box = Node(bytes(data[at + 4 : at + 8]), at, head, size)
        boxes.append(box)
        if deep and box.tag in _MP4_CHILDREN:
            boxes += mp4_boxes(data, box.data + _MP4_CHILDREN[box.tag], box.end)
        at += size
    return boxes


def _vint(data: bytes, at: int) -> tuple[int, int] | None:
    """(length in bytes, value without the marker bit) of the EBML variable-size integer at `at`."""
    if at >= len(data) or data[at] == 0:
        return None
    length = 9 - data[at].bit_length()
    if at + length > len(data):
        return None
    return length, _get(data, at, length) & ((1 << (7 * length)) - 1)


def mkv_elements(data: bytes, start: int = 0, end: int | None = None) -> list[Node]:
    """Every EBML element in data[start:end], depth first (the children of _MKV_MASTERS)."""
    end = len(data) if end is None else end
    elements, at = [], start
    while at < end:
        ident = _vint(data, at)
        size = None if ident is None else _vint(data, at + ident[0])
        if ident is None or size is None:
            break
        head = ident[0] + size[0]
        unknown = size[1] == (1 << (7 * size[0])) - 1
        length = end - at if unknown else head + size[1]
        if at + length > end:
            break
        element = Node(_get(data, at, ident[0]), at, head, length, ident[0])
        elements.append(element)
        if element.tag in _MKV_MASTERS:
            elements += mkv_elements(data, element.data, element.end)
        at += length
    return elements


def png_chunks(data: bytes) -> list[Node]:
    """Every chunk after the 8-byte signature: length, type, data, CRC."""
    chunks, at = [], 8
    while at + 12 <= len(data):
        size = 12 + _get(data, at, 4)
        if at + size > len(data):
            break
        chunks.append(Node(bytes(data[at + 4 : at + 8]), at, 8, size))
        at += size
    return chunks


def jpeg_segments(data: bytes) -> list[Node]:
    """Every marker segment from SOI up to and including the first scan's header (SOS)."""
    segments, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        size = 2 + _get(data, at + 2, 2)
        segments.append(Node(data[at + 1], at, 4, size))
        if data[at + 1] == 0xDA:
            break
        at += size
    return segments


def file_format(suffix: str) -> str:
    return {".mp4": "mp4", ".mov": "mp4", ".m4v": "mp4", ".mkv": "mkv", ".webm": "mkv", ".png": "png"}.get(
        suffix.lower(), "jpeg"
    )


def structure(data: bytes, fmt: str) -> list[Node]:
    return {"mp4": mp4_boxes, "mkv": mkv_elements, "png": png_chunks, "jpeg": jpeg_segments}[fmt](data)


# ----------------------------------------------------------------------------- the mutator


def kinds_for(fmt: str) -> tuple[str, ...]:
    middle = ("count",) if fmt == "mp4" else ()
    return ("flip", "truncate", "splice", "size", "type", *middle, "header", "stack")


def _extreme(rng: random.Random, value: int, width: int) -> int:
    """A value for a field of `width` bytes that used to hold `value`: one that readers trip on."""
    top = (1 << (8 * width)) - 1
    return rng.choice([0, 1, top, top >> 1, (top >> 1) + 1, value - 1, value + 1, value * 2, value // 2,
                       value ^ (1 << rng.randrange(8 * width)), rng.randrange(top + 1)]) & top  # fmt: skip


def _put(data: bytearray, at: int, width: int, value: int) -> None:
    data[at : at + width] = value.to_bytes(width, "big")


def _get(data: bytes, at: int, width: int) -> int:
    return int.from_bytes(data[at : at + width], "big")


def _pick(rng: random.Random, nodes: list[Node], named) -> Node:
    """A node, half the time one of the `named` tags when the file has any."""
    favoured = [n for n in nodes if n.tag in named]
    return rng.choice(favoured if favoured and rng.random() < 0.5 else nodes)


def _name(tag: bytes | int) -> str:
    return tag.decode(errors="replace") if isinstance(tag, bytes) else f"{tag:X}"


def mend_crc(out: bytearray, chunk: Node) -> None:
    """Recompute a PNG chunk's CRC (over type and data), so that the reader gets past it."""
    end = chunk.at + 8 + _get(out, chunk.at, 4)
    if end + 4 <= len(out):
        _put(out, end, 4, zlib.crc32(bytes(out[chunk.at + 4 : end])))


def _flip(out: bytearray, fmt: str, nodes: list[Node], rng: random.Random) -> str:
    count = rng.choice([1, 1, 2, 4, 8, 16, 64])
    for _ in range(count):
        out[rng.randrange(len(out))] ^= (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(1, 256)
    return f"{count} bytes"


def _truncate(out: bytearray, fmt: str, nodes: list[Node], rng: random.Random) -> str:
    size = len(out)
    if nodes and rng.random() < 0.5:
        node = rng.choice(nodes)
        cut = rng.choice([node.at, node.data, node.end]) + rng.choice([-1, 0, 0, 1])
    else:
        cut = rng.randrange(size)
    cut = min(max(cut, 0), size - 1)
    del out[cut:]
    return f"at {cut} of {size}"


def _splice(out: bytearray, fmt: str, nodes: list[Node], rng: random.Random) -> str:
    at = rng.randrange(len(out))
    length = min(rng.choice([1, 4, 16, 64, 256, 1024]), len(out) - at)
    how = rng.choice(["delete", "duplicate", "zero", "random"])
    if how == "delete":
        del out[at : at + length]
    elif how == "duplicate":
        out[at:at] = out[at : at + length]
    else:
        out[at : at + length] = bytes(length) if how == "zero" else rng.randbytes(length)
    return f"{how} {length} at {at}"


def _size(out: bytearray, fmt: str, nodes: list[Node], rng: random.Random) -> str:
    node = _pick(rng, nodes, {"mp4": _MP4_NAMED, "mkv": _MKV_MASTERS}.get(fmt, ()))
    if fmt == "mkv":  # the size vint, its length and marker bit kept
        at, width = node.at + node.id_len, node.head - node.id_len
        old = _vint(out, at)[1]
        new = _extreme(rng, old, width) & ((1 << (7 * width)) - 1)
        _put(out, at, width, new | (1 << (7 * width)))
    else:  # MP4: the box's size; PNG: the data's length; JPEG: the segment's length (after the marker)
        at, width = (node.at + 2, 2) if fmt == "jpeg" else (node.at, 4)
        old = _get(out, at, width)
        new = _extreme(rng, old, width)
        _put(out, at, width, new)
    return f"{_name(node.tag)} {old} -> {new}"


def _type(out: bytearray, fmt: str, nodes: list[Node], rng: random.Random) -> str:
    if fmt == "mkv":
        node = _pick(rng, nodes, set(_MKV_FIELDS) | _MKV_MASTERS)
        known = {n.tag for n in nodes} | _MKV_MASTERS | set(_MKV_FIELDS)
        same = sorted(t for t in known if (t.bit_length() + 7) // 8 == node.id_len and t != node.tag)
        new = rng.choice(same) if rng.random() < 0.7 else rng.randrange(1 << (8 * node.id_len))
        _put(out, node.at, node.id_len, new)
    elif fmt == "jpeg":
        node = rng.choice(nodes)
        new = rng.choice(_JPEG_MARKERS) if rng.random() < 0.7 else rng.randrange(256)
        out[node.at + 1] = new
    else:  # four characters: another type of the file or the format, or random letters
        node = _pick(rng, nodes, _MP4_NAMED if fmt == "mp4" else (b"IHDR", b"IDAT", b"eXIf"))
        known = {n.tag for n in nodes} | set({"mp4": (b"free", b"skip", b"mdat", b"moov"), "png": _PNG_TYPES}[fmt])
        new = rng.choice(sorted(known)) if rng.random() < 0.7 else bytes(rng.randrange(32, 127) for _ in range(4))
        out[node.at + 4 : node.at + 8] = new
        if fmt == "png":
            mend_crc(out, node)
    return f"{_name(node.tag)} -> {_name(new)}"


def _count(out: bytearray, fmt: str, nodes: list[Node], rng: random.Random) -> str:
    tables = [b for b in nodes if b.tag in _MP4_TABLES and b.size >= 16]
    box = _pick(rng, tables, (b"stsz", b"stco", b"stts", b"stsc", b"trun"))
    first, width = _MP4_TABLES[box.tag]
    entries = (box.end - box.at - first) // width if width else 0
    if entries and rng.random() < 0.5:  # one word of one entry
        word = rng.randrange(entries * width // 4)
        at, what = box.at + first + 4 * word, f"entry word {word}"
    else:
        at, what = box.at + 12, "count"
    new = _extreme(rng, _get(out, at, 4), 4)
    _put(out, at, 4, new)
    return f"{_name(box.tag)} {what} -> {new}"


def _header_fields(fmt: str, nodes: list[Node]) -> list[tuple[Node, int, int]]:
    """(node, offset from its start, width) of every field the header kind may edit."""
    if fmt == "mkv":
        fields = []
        for e in (e for e in nodes if e.tag in _MKV_FIELDS and e.size > e.head):
            if e.tag in (0x63A2, 0x86):  # codec private data, codec id: one byte of it
                fields += [(e, e.head + i, 1) for i in range(e.size - e.head)]
            else:  # a number (a block: its track, timestamp and flags)
                fields.append((e, e.head, min(e.size - e.head, 4 if e.tag in (0xA3, 0xA1) else 8)))
        return fields
    table = {"mp4": _MP4_FIELDS, "png": _PNG_FIELDS, "jpeg": _JPEG_FIELDS}[fmt]
    fields = [(n, at, w) for n in nodes for at, w in table.get(n.tag, ()) if at + w <= n.size]
    for n in nodes:  # EXIF (PNG eXIf, JPEG APP1) and JPEG's tables (DQT, DHT): one byte
        if n.tag in (b"eXIf", 0xE1, 0xDB, 0xC4):
            fields += [(n, n.head + i, 1) for i in range(n.size - n.head - (4 if fmt == "png" else 0))]
    return fields


def _header(out: bytearray, fmt: str, nodes: list[Node], rng: random.Random) -> str:
    node, offset, width = rng.choice(_header_fields(fmt, nodes))
    new = _extreme(rng, _get(out, node.at + offset, width), width)
    _put(out, node.at + offset, width, new)
    if fmt == "png":
        mend_crc(out, node)
    return f"{_MKV_FIELDS.get(node.tag) or _name(node.tag)}+{offset} -> {new}"


_KINDS = {"flip": _flip, "truncate": _truncate, "splice": _splice, "size": _size, "type": _type, "count": _count,
          "header": _header}  # fmt: skip


def mutate(data: bytes, fmt: str, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """A mutation of `kind` (see the module docstring) applied to data in format `fmt`; returns
    the new bytes and a short description of what changed (for reports)."""
    if kind != "stack":
        for _ in range(20):  # a field may already hold the value drawn: draw again
            out = bytearray(data)
            what = _KINDS[kind](out, fmt, structure(data, fmt), rng)
            if out != data:
                return bytes(out), what
        raise AssertionError(f"{kind} left the data unchanged")
    done = []
    for _ in range(rng.randint(2, 4)):
        step = rng.choice([k for k in kinds_for(fmt) if k not in ("stack", "truncate")])
        try:  # the structure the last step left may lack what this one edits
            data, what = mutate(data, fmt, step, rng)
        except IndexError:
            step, (data, what) = "flip", mutate(data, fmt, "flip", rng)
        done.append(f"{step} {what}")
    return data, "; ".join(done)


@dataclass(frozen=True)
class Case:
    """One mutated input: `name` the input's (a file or a folder), `files` its files (path
    relative to the working folder -> bytes), one of them mutated as `what` says."""

    index: int
    name: str
    kind: str
    what: str
    files: dict[str, bytes]


def make_case(inputs: dict[str, dict[str, bytes]], seed: int, index: int) -> Case:
    """Case `index` of run `seed`: the inputs taken in turn and each input's kinds in turn (every
    pair comes up within len(inputs) * 8 cases), the mutation drawn from Random(f"{seed}:{index}")."""
    names = sorted(inputs)
    name = names[index % len(names)]
    rng = random.Random(f"{seed}:{index}")
    target = rng.choice(sorted(inputs[name]))  # a folder's frames: one of them
    fmt = file_format(Path(target).suffix)
    kind = kinds_for(fmt)[(index // len(names)) % len(kinds_for(fmt))]
    data, what = mutate(inputs[name][target], fmt, kind, rng)
    return Case(index, name, kind, what if target == name else f"{Path(target).name}: {what}",
                {**inputs[name], target: data})  # fmt: skip


# ----------------------------------------------------------------------------- one case


class CaseTimeout(BaseException):
    """Raised on the main thread when a case runs past its limit (a BaseException, as a user's
    Ctrl-C would be, so that no `except Exception` in the library takes it for an error)."""


@dataclass(frozen=True)
class Outcome:
    """passed: ok (a decodable output) or error (a StylizeError, its message one line); failed:
    crash (any other exception: what the CLI's catch-all would meet), timeout, memory, input (the
    input's bytes changed), leftover (files beside the output), threads (ours still running),
    output (it does not decode as it should)."""

    status: str
    detail: str
    seconds: float
    peak_rss: int  # bytes

    @property
    def passed(self) -> bool:
        return self.status in ("ok", "error")


@contextlib.contextmanager
def time_limit(seconds: float):
    """CaseTimeout on the main thread after `seconds`. A hang inside one C call, where Python
    cannot raise, is ended by faulthandler after twice as long: every thread's stack is printed
    and the process exits."""

    def expire(signum, frame):
        raise CaseTimeout(f"still running after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(2 * seconds + 5, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


def reset_peak_rss() -> None:
    """Start a new peak (Linux: VmHWM back to the current size); elsewhere the peak stays the
    process's own, which only makes the check stricter."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """Peak resident memory in bytes since the last reset_peak_rss (Linux), else the process's."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _our_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(("decode:", "encode:", "handback"))}


def _output_problem(dst: Path, frames: int) -> str | None:
    """Why the output is not `frames` decodable frames (a still: one image), or None."""
    try:
        if dst.suffix == ".png":
            with Image.open(dst) as image:
                image.load()
            return None
        with av.open(str(dst)) as container:
            decoded = sum(1 for _ in container.decode(video=0))
    except (av.FFmpegError, OSError, IndexError) as exc:
        return f"the output does not decode: {exc}"
    return None if decoded == frames and frames > 0 else f"{decoded} frames decode, {frames} written"


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def run_case(case: Case, work: Path, stylizer, out_cfg, limit: float = LIMIT_S) -> Outcome:
    """Write the case's files into the empty folder `work` and stylize its input as the CLI would,
    into `<name>_fuzz.mp4` beside it (a still: `<stem>_fuzz.png`); judge the result (Outcome)."""
    from stylize.pipeline import out_of_memory_is_one_line, stylize_video
    from stylize.stills import stylize_still

    for relative, data in case.files.items():
        (work / relative).parent.mkdir(parents=True, exist_ok=True)
        (work / relative).write_bytes(data)
    src, still = work / case.name, case.name.endswith(".png")
    dst = src.with_name(f"{src.stem}_fuzz{'.png' if still else '.mp4'}")
    before, threads = _digest(work), _our_threads()
    reset_peak_rss()
    status, detail, frames = "ok", "", 0
    start = time.perf_counter()
    try:
        with time_limit(limit), out_of_memory_is_one_line(stylizer.cfg):  # as the CLI runs each input
            run = stylize_still(src, dst, stylizer) if still else stylize_video(src, dst, stylizer, out_cfg)
            frames = run.frames
    except StylizeError as exc:
        message = str(exc)
        status, detail = ("error", message) if message and "\n" not in message else ("crash", f"message {message!r}")
    except CaseTimeout as exc:
        status, detail = "timeout", str(exc)
    except Exception as exc:  # noqa: BLE001 - what the CLI's catch-all would meet: the failure sought
        where = traceback.extract_tb(exc.__traceback__)[-1]
        status, detail = "crash", f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})"
    seconds, peak = time.perf_counter() - start, peak_rss()
    after = _digest(work)
    left = sorted(set(after) - set(before) - ({dst.name} if status == "ok" else set()))
    if any(after.get(k) != v for k, v in before.items()):
        status, detail = "input", "the input's bytes changed"
    elif left:
        status, detail = "leftover", f"left beside the output: {left}"
    elif _our_threads() - threads:
        status, detail = "threads", f"still running: {sorted(t.name for t in _our_threads() - threads)}"
    elif peak > RSS_LIMIT:
        status, detail = "memory", f"peak resident memory {peak / 2**30:.2f} GiB"
    elif status == "ok" and (problem := _output_problem(dst, frames)):
        status, detail = "output", problem
    elif status == "ok":
        detail = f"{frames} frames"
    return Outcome(status, detail, seconds, peak)


def clean(folder: Path) -> None:
    """Empty `folder` for the next case."""
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
