"""MIDI <-> performance events: vocabulary, round trip within quantisation, pedal, overlaps, windows."""
from __future__ import annotations

import numpy as np
import pretty_midi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tda_core.data import midi_codec as mc
from tda_core.objectives import IGNORE

TICK_S = 1 / (2 * 220)  # pretty_midi writes at 220 ticks per beat, 120 bpm
TIME_TOL = mc.STEP_S / 2 + TICK_S + 1e-9
VELOCITY_TOL = mc.VELOCITY_STEP // 2


def random_midi(seed: int, n_notes: int = 200) -> pretty_midi.PrettyMIDI:
    """Notes on two instruments with gaps and durations up to 2.5 s; no two notes of one pitch overlap."""
    rng = np.random.default_rng(seed)
    midi = pretty_midi.PrettyMIDI()
    insts = [pretty_midi.Instrument(0), pretty_midi.Instrument(40)]
    free_at: dict[int, float] = {}
    t = 0.0
    for _ in range(n_notes):
        t += float(rng.choice([0.0, rng.uniform(0, 0.3), rng.uniform(1.0, 2.5)], p=[0.3, 0.6, 0.1]))
        pitch = int(rng.integers(21, 109))
        start = max(t, free_at.get(pitch, 0.0))
        end = start + float(rng.uniform(0.02, 2.5))
        free_at[pitch] = end
        insts[int(rng.integers(2))].notes.append(
            pretty_midi.Note(velocity=int(rng.integers(1, 128)), pitch=pitch, start=start, end=end))
    midi.instruments.extend(insts)
    return midi


def sorted_notes(notes) -> list[tuple[int, float, float, int]]:
    return sorted((n.pitch, n.start, n.end, n.velocity) for n in notes)


def test_vocabulary_layout():
    assert (mc.NOTE_ON, mc.NOTE_OFF, mc.TIME_SHIFT, mc.VELOCITY) == (0, 128, 256, 356)
    assert (mc.END, mc.PAD, mc.VOCAB_SIZE) == (388, 389, 390)
    assert mc.token_name(60) == "on C4" and mc.token_name(128 + 60) == "off C4"
    assert mc.token_name(256) == "shift 10 ms" and mc.token_name(355) == "shift 1000 ms"
    assert mc.token_name(mc.END) == "END"


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_keeps_every_note_within_quantisation(seed):
    original = random_midi(seed)
    data = mc.midi_bytes(original)
    tokens = mc.encode_midi(data)
    assert tokens.dtype == np.int64 and tokens[-1] == mc.END
    assert tokens.min() >= 0 and tokens.max() < mc.PAD
    expected = sorted_notes(mc.midi_notes(mc.read_midi(data)))
    assert len(expected) == 200
    got = sorted_notes(mc.decode_notes(tokens))
    assert len(got) == len(expected)
    for (p, s, e, v), (p2, s2, e2, v2) in zip(expected, got):
        assert p == p2
        assert abs(s - s2) <= TIME_TOL and abs(e - e2) <= TIME_TOL
        assert abs(v - v2) <= VELOCITY_TOL
    # and back through a MIDI file again
    again = sorted_notes(mc.midi_notes(mc.read_midi(mc.midi_bytes(mc.decode_midi(tokens)))))
    assert [n[0] for n in again] == [n[0] for n in got]
    assert np.allclose([n[1:3] for n in again], [n[1:3] for n in got], atol=TICK_S)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 127), st.integers(0, 500), st.integers(1, 300), st.integers(1, 127)),
                min_size=1, max_size=30))
def test_round_trip_property_on_distinct_pitches(raw):
    notes, seen = [], set()
    for pitch, start, length, vel in raw:
        if pitch not in seen:  # one note per pitch: no overlaps to resolve
            seen.add(pitch)
            notes.append(mc.Note(pitch, start * mc.STEP_S, (start + length) * mc.STEP_S, vel))
    got = {n.pitch: n for n in mc.decode_notes(mc.encode_notes(notes))}
    assert set(got) == seen
    for n in notes:
        g = got[n.pitch]
        assert g.start == pytest.approx(n.start, abs=1e-9) and g.end == pytest.approx(n.end, abs=1e-9)
        assert abs(g.velocity - n.velocity) <= VELOCITY_TOL


def test_velocity_token_only_when_bin_changes():
    notes = [mc.Note(60, 0.0, 0.5, 80), mc.Note(64, 0.0, 0.5, 81), mc.Note(67, 0.5, 1.0, 20)]
    names = [mc.token_name(t) for t in mc.encode_notes(notes)]
    assert names == ["velocity 82", "on C4", "on E4", "shift 500 ms", "off C4", "off E4", "velocity 22", "on G4",
                     "shift 500 ms", "off G4", "END"]


def test_sustain_pedal_lengthens_notes():
    midi = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(0)
    inst.notes = [pretty_midi.Note(90, 60, 0.0, 0.5), pretty_midi.Note(90, 62, 2.0, 2.5)]
    inst.control_changes = [pretty_midi.ControlChange(64, 127, 0.2), pretty_midi.ControlChange(64, 0, 1.5)]
    midi.instruments.append(inst)
    ends = {n.pitch: n.end for n in mc.midi_notes(midi)}
    assert ends == {60: 1.5, 62: 2.5}
    assert {n.pitch: n.end for n in mc.midi_notes(midi, sustain=False)} == {60: 0.5, 62: 2.5}


def test_same_pitch_overlaps_are_cut_and_duplicates_merged():
    notes = [mc.Note(60, 0.0, 1.0, 80), mc.Note(60, 0.5, 0.8, 80), mc.Note(62, 0.0, 0.3, 80),
             mc.Note(62, 0.0, 0.6, 80)]
    got = sorted_notes(mc.decode_notes(mc.encode_notes(notes)))
    assert got == [(60, 0.0, 0.5, 82), (60, 0.5, 0.8, 82), (62, 0.0, 0.6, 82)]


def test_windows_shift_targets_and_pad():
    tokens = np.arange(600) % 380
    x, y, starts = mc.windows(tokens, length=256)
    assert x.shape == y.shape == (2, 256) and starts.tolist() == [0, 256]  # 87 targets left: < half, dropped
    assert (y[:, :-1] == x[:, 1:]).all() and y[0, -1] == tokens[256]
    x, y, starts = mc.windows(tokens, length=256, min_fill=0.25)
    assert starts.tolist() == [0, 256, 512]
    assert (x[2, :87] == tokens[512:599]).all() and (x[2, 87:] == mc.PAD).all()
    assert (y[2, :87] == tokens[513:600]).all() and (y[2, 87:] == IGNORE).all()
    assert (mc.window_tokens(x[2], y[2]) == tokens[512:600]).all()
    assert (mc.window_tokens(x[0], y[0]) == tokens[:257]).all()


def test_unreadable_midi_raises():
    with pytest.raises(Exception):
        mc.read_midi(b"MThd this is not a MIDI file")
