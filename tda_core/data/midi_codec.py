"""MIDI <-> performance-event tokens (the MAESTRO / Music Transformer vocabulary), and fixed-length windows.

Vocabulary (390 tokens): 128 note-on, 128 note-off, 100 time-shift steps (10 ms .. 1 s),
32 velocity bins, then END and PAD. A velocity token is emitted before a note-on only when
the velocity bin changes. pretty_midi does the MIDI file I/O; the event coding is ours.
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pretty_midi

from ..objectives import IGNORE

N_PITCHES = 128
N_SHIFTS = 100
N_VELOCITIES = 32
NOTE_ON = 0
NOTE_OFF = NOTE_ON + N_PITCHES
TIME_SHIFT = NOTE_OFF + N_PITCHES
VELOCITY = TIME_SHIFT + N_SHIFTS
END = VELOCITY + N_VELOCITIES
PAD = END + 1
VOCAB_SIZE = PAD + 1
STEP_S = 0.01  # one time-shift step, seconds
VELOCITY_STEP = 128 // N_VELOCITIES
DEFAULT_VELOCITY = 64  # velocity assumed before the first velocity token (e.g. mid-piece windows)
CODEC_VERSION = 1  # bump when encoding changes, so cached corpora are rebuilt
WINDOW = 256
MAX_FILE_BYTES = 16 << 20  # MIDI files above this are refused unread (MAESTRO's largest is about 1 MB)
MAX_PIECE_S = 4 * 3600.0  # a longer piece is a corrupt file (e.g. a mutated tempo or delta time)


class MidiError(ValueError):
    """A MIDI file that cannot be used: unreadable, too large or too long. The message says which and why."""


@dataclasses.dataclass(frozen=True)
class Note:
    """One note: MIDI pitch, start and end in seconds, MIDI velocity 1..127."""

    pitch: int
    start: float
    end: float
    velocity: int


def read_midi(source: str | os.PathLike | bytes) -> pretty_midi.PrettyMIDI:
    """Parse a MIDI file from a path or from bytes (raises on unreadable data)."""
    if isinstance(source, (bytes, bytearray)):
        return pretty_midi.PrettyMIDI(io.BytesIO(bytes(source)))
    return pretty_midi.PrettyMIDI(str(source))


def _sustained_ends(instrument: pretty_midi.Instrument, end_time: float) -> list[float]:
    """Note ends lengthened to the pedal release while the sustain pedal (CC 64 >= 64) is down."""
    intervals, down_at = [], None
    for cc in sorted((c for c in instrument.control_changes if c.number == 64), key=lambda c: c.time):
        if cc.value >= 64 and down_at is None:
            down_at = cc.time
        elif cc.value < 64 and down_at is not None:
            intervals.append((down_at, cc.time))
            down_at = None
    if down_at is not None:
        intervals.append((down_at, end_time))
    ends = []
    for note in instrument.notes:
        end = note.end
        for lo, hi in intervals:
            if lo <= note.end < hi:
                end = max(end, hi)
        ends.append(end)
    return ends


def midi_notes(midi: pretty_midi.PrettyMIDI, sustain: bool = True) -> list[Note]:
    """All non-drum notes of every instrument, merged; `sustain` applies the sustain pedal to note ends."""
    notes = []
    end_time = midi.get_end_time()
    for inst in midi.instruments:
        if inst.is_drum:
            continue
        ends = _sustained_ends(inst, end_time) if sustain else [n.end for n in inst.notes]
        notes.extend(Note(n.pitch, n.start, end, n.velocity) for n, end in zip(inst.notes, ends))
    return notes


def _quantised(notes: Iterable[Note]) -> list[tuple[int, int, int, int]]:
    """(start step, end step, pitch, velocity bin), at least one step long; a note sounding when the same
    pitch starts again ends there, and duplicate onsets of one pitch merge (a piano key plays once)."""
    q = sorted((round(n.start / STEP_S), max(round(n.end / STEP_S), round(n.start / STEP_S) + 1), n.pitch,
                min(max(n.velocity, 0), 127) // VELOCITY_STEP) for n in notes)
    out: list[tuple[int, int, int, int]] = []
    last: dict[int, int] = {}  # pitch -> position in `out` of its latest note
    for start, end, pitch, vel in q:
        k = last.get(pitch)
        if k is not None and out[k][1] > start:
            s0, e0, _, v0 = out[k]
            if s0 == start:
                out[k] = (s0, max(e0, end), pitch, v0)
                continue
            out[k] = (s0, start, pitch, v0)
        last[pitch] = len(out)
        out.append((start, end, pitch, vel))
    return out


def encode_notes(notes: Iterable[Note], end: bool = True) -> np.ndarray:
    """Notes -> event tokens (int64); `end` appends the END token."""
    events = []  # (step, order, token): note-offs before velocity changes before note-ons at one time
    for start, stop, pitch, vel in _quantised(notes):
        events.append((start, 2, pitch, vel))
        events.append((stop, 0, pitch, vel))
    events.sort()
    tokens: list[int] = []
    now, velocity = 0, None
    for step, kind, pitch, vel in events:
        while step > now:
            shift = min(step - now, N_SHIFTS)
            tokens.append(TIME_SHIFT + shift - 1)
            now += shift
        if kind == 0:
            tokens.append(NOTE_OFF + pitch)
            continue
        if vel != velocity:
            tokens.append(VELOCITY + vel)
            velocity = vel
        tokens.append(NOTE_ON + pitch)
    if end:
        tokens.append(END)
    return np.asarray(tokens, dtype=np.int64)


def decode_notes(tokens: Sequence[int] | np.ndarray) -> list[Note]:
    """Event tokens -> notes. Stops at END; skips PAD/ignored tokens and note-offs with no open note;
    notes still open at the end close at the last time reached."""
    open_notes: dict[int, tuple[float, int]] = {}
    notes: list[Note] = []
    now, velocity = 0, DEFAULT_VELOCITY
    for tok in np.asarray(tokens).tolist():
        if tok == END:
            break
        if NOTE_ON <= tok < NOTE_OFF:
            pitch = tok - NOTE_ON
            if pitch in open_notes:  # re-struck before released: end the sounding note
                start, vel = open_notes.pop(pitch)
                if now > start:
                    notes.append(Note(pitch, start * STEP_S, now * STEP_S, vel))
            open_notes[pitch] = (now, velocity)
        elif NOTE_OFF <= tok < TIME_SHIFT:
            pitch = tok - NOTE_OFF
            if pitch in open_notes:
                start, vel = open_notes.pop(pitch)
                notes.append(Note(pitch, start * STEP_S, max(now, start + 1) * STEP_S, vel))
        elif TIME_SHIFT <= tok < VELOCITY:
            now += tok - TIME_SHIFT + 1
        elif VELOCITY <= tok < END:
            velocity = (tok - VELOCITY) * VELOCITY_STEP + VELOCITY_STEP // 2
    for pitch, (start, vel) in open_notes.items():
        notes.append(Note(pitch, start * STEP_S, max(now, start + 1) * STEP_S, vel))
    return sorted(notes, key=lambda n: (n.start, n.pitch))


def encode_midi(source: pretty_midi.PrettyMIDI | str | os.PathLike | bytes, sustain: bool = True,
                end: bool = True) -> np.ndarray:
    """A MIDI file (object, path or bytes) -> event tokens."""
    midi = source if isinstance(source, pretty_midi.PrettyMIDI) else read_midi(source)
    return encode_notes(midi_notes(midi, sustain), end)


def load_midi_tokens(source: str | os.PathLike | bytes, sustain: bool = True) -> np.ndarray:
    """Event tokens of a MIDI file from disk or bytes, with bounded time and memory; any file that cannot be
    used raises MidiError (never another exception): unreadable, above MAX_FILE_BYTES, or longer than
    MAX_PIECE_S (a damaged tempo or delta time). pretty_midi itself refuses files past 10^7 ticks."""
    size = len(source) if isinstance(source, (bytes, bytearray)) else os.path.getsize(source)
    if size > MAX_FILE_BYTES:
        raise MidiError(f"{size} bytes, above the {MAX_FILE_BYTES >> 20} MiB ceiling for a MIDI file")
    try:
        with warnings.catch_warnings():  # pretty_midi's doubts about a damaged file: the MidiError says it
            warnings.simplefilter("ignore")
            midi = read_midi(source)
            notes = midi_notes(midi, sustain)
    except Exception as exc:  # noqa: BLE001 - mido / pretty_midi raise many kinds on damaged bytes
        raise MidiError(f"not a readable MIDI file ({type(exc).__name__}: {exc})") from None
    last = max((n.end for n in notes), default=0.0)
    if not 0.0 <= last <= MAX_PIECE_S or not all(0.0 <= n.start <= n.end for n in notes):
        raise MidiError(f"its notes span {last:.0f} s (ceiling {MAX_PIECE_S:.0f} s) or run backwards: a damaged "
                        "tempo or delta time")
    return encode_notes(notes)


def notes_to_midi(notes: Iterable[Note], program: int = 0) -> pretty_midi.PrettyMIDI:
    """Notes -> a one-instrument PrettyMIDI (acoustic grand piano by default)."""
    midi = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=program, name="piano")
    inst.notes = [pretty_midi.Note(velocity=n.velocity, pitch=n.pitch, start=n.start, end=n.end) for n in notes]
    midi.instruments.append(inst)
    return midi


def decode_midi(tokens: Sequence[int] | np.ndarray, program: int = 0) -> pretty_midi.PrettyMIDI:
    """Event tokens -> a PrettyMIDI object."""
    return notes_to_midi(decode_notes(tokens), program)


def midi_bytes(midi: pretty_midi.PrettyMIDI) -> bytes:
    """A PrettyMIDI object as standard MIDI file bytes."""
    buf = io.BytesIO()
    midi.write(buf)
    return buf.getvalue()


def window_starts(n_tokens: int, length: int = WINDOW, min_fill: float = 0.5) -> np.ndarray:
    """Token offsets of the windows of a piece of `n_tokens` tokens: one every `length` tokens, dropping a
    final window with fewer than `min_fill * length` next-token targets."""
    starts = np.arange(0, max(n_tokens - 1, 0), length, dtype=np.int64)
    return starts[np.minimum(n_tokens - 1 - starts, length) >= min_fill * length]


def cut_window(tokens: np.ndarray, start: int, length: int = WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """One next-token window at `start`: x (length,) inputs padded with PAD, y (length,) targets padded
    with IGNORE."""
    chunk = np.asarray(tokens[start:start + length + 1], dtype=np.int64)
    n = max(len(chunk) - 1, 0)
    x = np.full(length, PAD, dtype=np.int64)
    y = np.full(length, IGNORE, dtype=np.int64)
    x[:n], y[:n] = chunk[:n], chunk[1:]
    return x, y


def windows(tokens: np.ndarray, length: int = WINDOW,
            min_fill: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All windows of one piece: x (n, length), y (n, length) and their token offsets (n,)."""
    starts = window_starts(len(tokens), length, min_fill)
    pairs = [cut_window(tokens, int(s), length) for s in starts]
    x = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, length), dtype=np.int64)
    y = np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, length), dtype=np.int64)
    return x, y, starts


def window_tokens(x: Sequence[int] | np.ndarray, y: Sequence[int] | np.ndarray) -> np.ndarray:
    """The window's full token run (inputs plus the last target), without padding."""
    x, y = np.asarray(x), np.asarray(y)
    valid = y != IGNORE
    n = int(valid.sum())
    return np.concatenate([x[:n], y[n - 1:n]]) if n else np.zeros(0, dtype=np.int64)


def token_name(token: int) -> str:
    """A readable name: 'on C4', 'off C4', 'shift 120 ms', 'velocity 84', 'END', 'PAD'."""
    if NOTE_ON <= token < NOTE_OFF:
        return f"on {pretty_midi.note_number_to_name(token - NOTE_ON)}"
    if NOTE_OFF <= token < TIME_SHIFT:
        return f"off {pretty_midi.note_number_to_name(token - NOTE_OFF)}"
    if TIME_SHIFT <= token < VELOCITY:
        return f"shift {(token - TIME_SHIFT + 1) * 10} ms"
    if VELOCITY <= token < END:
        return f"velocity {(token - VELOCITY) * VELOCITY_STEP + VELOCITY_STEP // 2}"
    return {END: "END", PAD: "PAD"}.get(token, f"? {token}")
