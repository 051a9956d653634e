"""The dataset doctor: find every index entry that training would fail on or skip, before a large job starts.

    python -m engine.data.inspect INDEX.csv [more ...] [--decoder pyav|dali] [--limit N] [--workers W]
        [--min-frames N] [--min-bytes B] [--max-bytes B] [--bad-list FILE] [--no-cache]

Each entry (or a reproducible sample of `--limit` of them) goes through, in a pool of processes:

1. `probe_file`: the cheap look training does too (missing, empty, not a video, unsupported codec, truncated, ...),
   and the size limits (`data.min_video_bytes` / `data.max_video_bytes`);
2. a full decode of every frame with the decoder training will use, since a damaged stream demuxes cleanly and only
   fails when decoded. With `--decoder dali`, codecs DALI cannot read on this host are checked with PyAV instead
   (training falls back to PyAV for them too) and noted as `pyav fallback`;
3. `--min-frames`: the frames a clip needs (`frames_per_clip * frame step`) when training filters short videos.

It prints one tab-separated line per file, in index order (`path, ok | BAD <kind>: <detail>, frames, fps, WxH,
codec, seconds[, note]`), then a summary, and exits 0 when every checked file is ok, 1 when any is bad, 2 on a
usage error (130 when interrupted). The probes are saved in each index's probe cache (`<index>.probe.csv`), which
training loads instead of probing again; a file found corrupt is cached as a failed probe, so training skips it
without decoding it. Size limits and `--min-frames` depend on the config and are never cached.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import re
import signal
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import av
import numpy as np

from engine.data.dali_decode import dali_available
from engine.data.decode import to_rgb
from engine.data.index import is_image, read_index
from engine.data.probe import MAX_BYTES, MIN_BYTES, Probe, ProbeTable, bad, codec_of, probe_file, within_size_limits

DALI_CHUNK = 32  # frame indices per DALI call: bounds the decoder's output buffer whatever the video's length
DALI_CROP = 32  # the decoded frames are only checked, so they are resized to almost nothing


@dataclass(frozen=True)
class Check:
    """One entry's verdict: the probe (cached or new), why the file is bad ("" when it is ok) and a note."""

    probe: Probe
    reason: str = ""
    note: str = ""

    def to_cache(self) -> Probe:
        """The probe, or a failed one when decoding found the stream corrupt, so training skips the file."""
        if not self.reason.startswith("corrupt"):
            return self.probe  # size limits and --min-frames depend on the config: never cached
        return bad(self.probe.path, "corrupt", self.reason.partition(": ")[2], self.probe.size, self.probe.mtime_ns)


def decode_all_pyav(path: str) -> str:
    """Decode every frame of the first video stream; returns the reason it is corrupt, or "" when it is not."""
    decoded = 0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # the pool already keeps every core busy
            last = None
            for last in container.decode(stream):
                decoded += 1
            if last is not None:
                to_rgb(last)  # the pixel format converts as training will convert it
    except av.FFmpegError as e:
        return f"corrupt: {e.strerror or e} after {decoded} frames"
    # Fewer frames than packets is normal (a decoder may drop some); none at all is not.
    return "" if decoded else "corrupt: no decodable frame"


_dali_decoders: dict[str, object] = {}  # one DALI pipeline per worker process: building one takes a while


def decode_all_dali(probe: Probe) -> tuple[str, str]:
    """`(reason, note)` of a full DALI decode of `probe.path`, or of PyAV's for a codec DALI cannot decode here."""
    import torch
    from engine.data.dali_decode import DaliClipDecoder, DaliDecodeError, dali_codecs

    device = "gpu" if torch.cuda.is_available() else "cpu"
    capability = torch.cuda.get_device_capability() if device == "gpu" else None
    if codec_of(probe.codec) not in dali_codecs(device, capability):
        return decode_all_pyav(probe.path), f"pyav fallback: DALI ({device}) cannot decode {probe.codec}"
    if device not in _dali_decoders:
        _dali_decoders[device] = DaliClipDecoder(crop_size=DALI_CROP, frames_per_clip=DALI_CHUNK, device=device,
                                                 max_batch_size=1, num_threads=1)
    decoder = _dali_decoders[device]
    encoded = np.fromfile(probe.path, dtype=np.uint8)
    box = (0, 0, probe.height, probe.width)
    for start in range(0, probe.frames, DALI_CHUNK):
        # The last chunk repeats its last frame: the pipeline takes a fixed number of frames per clip.
        chunk = np.minimum(np.arange(start, start + DALI_CHUNK), probe.frames - 1)
        try:
            decoder.decode([encoded], [chunk], [box], [False])
        except DaliDecodeError as e:
            # Training decodes a batch DALI fails on again with PyAV, so the file is bad only if PyAV fails too.
            dali_reason = re.sub(r"^DALI could not decode a batch of 1 clip\(s\): ", "", str(e))
            pyav_reason = decode_all_pyav(probe.path)
            if pyav_reason:
                return f"{pyav_reason} (DALI: {dali_reason})", ""
            return "", f"pyav fallback: DALI failed ({dali_reason})"
    return "", ""


def check_file(path: str, cached: Probe | None, decoder: str = "pyav", min_frames: int = 1,
               min_bytes: int = MIN_BYTES, max_bytes: int = MAX_BYTES) -> Check:
    """Probe (unless `cached`), apply the size limits, fully decode and apply `min_frames` to one file."""
    probe = cached or probe_file(path)
    limited = within_size_limits(probe, min_bytes, max_bytes)
    if not limited.ok:
        return Check(probe, limited.reason)
    reason, note = "", ""
    if not is_image(path):  # the probe decoded the image: that is all of it
        try:
            reason, note = decode_all_dali(probe) if decoder == "dali" else (decode_all_pyav(path), "")
        except Exception as e:  # noqa: BLE001 - one odd file must not stop a run over millions
            reason = f"error: {type(e).__name__}: {e}"
    if not reason and not is_image(path) and probe.frames < min_frames:
        reason = f"too short: {probe.frames} frames < {min_frames}"
    return Check(probe, " ".join(reason.split()), note)  # one line per file, whatever FFmpeg or DALI said


def format_line(path: str, check: Check) -> str:
    p = check.probe
    known = p.frames > 0  # a failed probe knows nothing of the stream
    fields = [path, "ok" if not check.reason else f"BAD {check.reason}",
              str(p.frames) if known else "-", f"{p.fps:.2f}" if p.fps else "-",
              f"{p.width}x{p.height}" if known else "-", p.codec or "-", f"{p.duration:.2f}s" if p.fps else "-"]
    return "\t".join(fields + ([check.note] if check.note else []))


def summary(checks: list[Check], total: int, bad_list: str | None) -> list[str]:
    ok = [c.probe for c in checks if not c.reason]
    kinds = collections.Counter(c.reason.split(":", 1)[0] for c in checks if c.reason)
    notes = collections.Counter(c.note.split(":", 1)[0] for c in checks if c.note)
    lines = [f"checked {len(checks)} of {total} files: {len(ok)} ok, {sum(kinds.values())} bad"]
    if kinds:
        lines.append("bad: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    if notes:
        lines.append("notes: " + ", ".join(f"{k} {n}" for k, n in notes.most_common()))
    if ok:
        codecs = collections.Counter(p.codec for p in ok)
        lines.append("codecs: " + ", ".join(f"{k} {n}" for k, n in codecs.most_common()))
        small, large = min(ok, key=lambda p: p.width * p.height), max(ok, key=lambda p: p.width * p.height)
        lines.append(f"resolution: {small.width}x{small.height} to {large.width}x{large.height}")
        seconds = sum(p.duration for p in ok)
        lines.append(f"total duration: {seconds / 3600:.2f} h ({seconds:.1f} s)")
    if kinds:
        lines.append(f"bad files with reasons written to {bad_list}" if bad_list else
                     "hint: --bad-list FILE writes the bad files as '<path><TAB><reason>' lines")
    return lines


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: no traceback per worker


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.data.inspect", description=__doc__.split("\n")[0],
                                     epilog="exit status: 0 all ok, 1 some bad, 2 usage error, 130 interrupted")
    parser.add_argument("index", nargs="+", help="index files (.csv '<path> <label>' lines, or .npy)")
    parser.add_argument("--decoder", choices=["pyav", "dali"], default="pyav", help="the decoder training uses")
    parser.add_argument("--limit", type=int, metavar="N", help="check a reproducible random sample of N entries")
    parser.add_argument("--workers", type=int, metavar="W", default=min(8, os.cpu_count() or 1),
                        help="processes (default %(default)s)")
    parser.add_argument("--min-frames", type=int, metavar="N", default=1, help="fewer frames is bad (default %(default)s)")
    parser.add_argument("--min-bytes", type=int, metavar="B", default=MIN_BYTES, help="default %(default)s")
    parser.add_argument("--max-bytes", type=int, metavar="B", default=MAX_BYTES, help="default %(default)s")
    parser.add_argument("--bad-list", metavar="FILE", help="write '<path><TAB><reason>' per bad file")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the probe caches")
    args = parser.parse_args(argv)
    for name in ("limit", "workers", "min_frames"):
        if getattr(args, name) is not None and getattr(args, name) < (0 if name == "min_frames" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        index = read_index(args.index)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 2
    if args.decoder == "dali" and not dali_available():
        print("inspect: --decoder dali needs NVIDIA DALI: pip install nvidia-dali-cuda130", file=sys.stderr)
        return 2
    entries = np.arange(len(index))
    if args.limit is not None and args.limit < len(index):
        entries = np.sort(np.random.default_rng(0).choice(len(index), args.limit, replace=False))
    table = ProbeTable(index)
    if not args.no_cache:
        table.load()

    # Spawned workers for DALI: CUDA and DALI's threads do not survive a fork.
    context = multiprocessing.get_context("spawn" if args.decoder == "dali" else None)
    pool = ProcessPoolExecutor(args.workers, mp_context=context, initializer=_ignore_sigint)
    pending: collections.deque[tuple[int, Future]] = collections.deque()
    checks: list[Check] = []
    bad_files: list[tuple[str, str]] = []
    started = last_report = time.monotonic()
    todo = iter(entries.tolist())
    interrupted = crashed = False
    try:
        while True:
            # A bounded window of submitted files keeps memory flat on millions of entries; in order, so the report is.
            while len(pending) < 4 * args.workers and (entry := next(todo, None)) is not None:
                cached = table.get(entry)
                if cached is not None and cached.reason.startswith("corrupt"):
                    cached = None  # the full decode always runs: a decoder or FFmpeg upgrade may read it now
                pending.append((entry, pool.submit(check_file, index.paths[entry], cached, args.decoder,
                                                   args.min_frames, args.min_bytes, args.max_bytes)))
            if not pending:
                break
            entry, future = pending.popleft()
            check = future.result()
            checks.append(check)
            table.put(entry, check.to_cache())
            if check.reason:
                bad_files.append((index.paths[entry], check.reason))
            print(format_line(index.paths[entry], check), flush=True)
            if time.monotonic() - last_report > 2:
                last_report = time.monotonic()
                print(f"checked {len(checks)}/{len(entries)}, bad {len(bad_files)}, "
                      f"{len(checks) / (last_report - started):.1f} files/s", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: reporting the {len(checks)} files checked so far", file=sys.stderr)
    except BrokenProcessPool:  # a worker died: FFmpeg (or DALI) crashed on a file, or the host ran out of memory
        crashed = True
        print("inspect: a worker process died while checking one of these files (--workers 1 tells which):\n  "
              + "\n  ".join(index.paths[entry] for entry, _ in list(pending)[:args.workers + 1]), file=sys.stderr)
    finally:
        try:  # only the few files already handed to workers are finished: the rest are cancelled
            pool.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt:
            interrupted = True
    if not args.no_cache:
        table.save()
    if args.bad_list:
        with open(args.bad_list, "w") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in bad_files)
    print("\n".join(summary(checks, len(entries), args.bad_list)))
    return 130 if interrupted else 1 if bad_files or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
