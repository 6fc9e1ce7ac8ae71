"""Property-based tests (hypothesis): whatever a user types or points at gives a result or one line and exit 2.

Example counts are fixed per test (`EXAMPLES`) and stated in the README's "Reliability and security" section.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import os
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tda_core.errors import UserError

EXAMPLES = {"cli": 120, "specs": 300, "store_names": 300, "midi_random": 300, "midi_mutated": 300, "cifar": 60,
            "idx": 60, "maestro_csv": 40, "image_folder": 60}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class WorkStarted(Exception):
    """Raised where real work (training a model, converting a corpus) would begin: the arguments were valid."""


@pytest.fixture
def guarded(monkeypatch, tmp_path):
    """Training and corpus conversion raise WorkStarted; relative output paths land in a temp folder."""
    def refuse(*args, **kwargs):
        raise WorkStarted

    for target in ("tda_core.training.train_many", "tda_core.evaluation.train_many",
                   "tda_core.data.music.convert_chorales", "socket.socket.connect"):  # no training, no downloads
        monkeypatch.setattr(target, refuse)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "junk.csv").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "nocolumns.csv").write_text("a,b\n1,2\n")
    (tmp_path / "adir.npz").mkdir()
    (tmp_path / "junk.npz").write_bytes(bytes(range(256)))
    (tmp_path / "tasks.py").write_text("raise RuntimeError('a broken tasks file')\n")
    return tmp_path


def cli(argv: list[str]) -> tuple[int | str, str]:
    """Run the CLI in this process: (exit code or 'work', stderr)."""
    from tda_core.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code: int | str = main(argv)
        except WorkStarted:
            code = "work"
        except SystemExit as exc:  # argparse: --help or a bad argument
            code = int(exc.code or 0)
    return code, err.getvalue()


# --- the command line --------------------------------------------------------------------------------
NUMBERS = st.one_of(st.integers(-10**6, 10**6), st.sampled_from([0, -1, 1, 2, 1000, 1001, 10**9, 10**30]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0, 0.5, 1.5]))
SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
VALUE = st.one_of(NUMBERS.map(str), FLOATS.map(repr), SAFE_TEXT)
TASKS = st.one_of(st.just("digits-mlp"), st.sampled_from(["digits-mlp", "mnist-mlp", "cifar2-mlp", "maestro-mt",
                                                           "chorales-mt", "nope", "../digits-mlp", ""]))
PATHS = st.sampled_from(["out.npz", "out.safetensors", "out.txt", "missing/dir/x.npz", "adir.npz", ".", "x.html",
                         "x.png", "x.mid", "/proc/x.npz", "empty.csv", "junk.csv", "nocolumns.csv", "none.csv",
                         "tasks.py", "junk.npz"])
SEEDS = st.one_of(st.sampled_from(["0", "0-4", "0,3,7", "5-1", "-3", "0-100000000", "a-b", "", ",", "1--2"]),
                  SAFE_TEXT)
SETTING_TEXT = st.one_of(st.sampled_from(["kind=naive", "kind=dropout,I=2,D=5", "kind=lora,L=2", "method=trak",
                                          "kind=naive,bogus=1", "I=0", "kind=dropout,D=99999", "=", ",", "I=x"]),
                         SAFE_TEXT)
NOT_FUZZED = {"--store", "--data-dir", "--device", "--json", "--task", "--help"}  # set by the test itself
PATH_WORDS = ("path", "out", "csv", "plot", "markdown", "scores", "save", "html", "wav", "tasks_file")


@functools.cache
def _options(command: str) -> list[argparse.Action]:
    """The options and positionals of a command, read from the CLI's own parser (so new ones are fuzzed too)."""
    from tda_core.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return [a for a in sub._actions if not set(a.option_strings) & NOT_FUZZED and a.dest != "help"]


def _value(action: argparse.Action) -> st.SearchStrategy:
    """Valid values mixed with anything: most draws are plausible, some are garbage."""
    if action.dest == "seeds" and action.type is None:
        return SEEDS
    if action.dest.startswith("setting_"):
        return SETTING_TEXT
    if any(word in action.dest for word in PATH_WORDS):
        return PATHS
    plausible = (st.sampled_from([str(c) for c in action.choices]) if action.choices else NUMBERS.map(str)
                 if action.type is int else FLOATS.map(repr) if action.type is float else SAFE_TEXT)
    return st.one_of(plausible, plausible, VALUE)


@st.composite
def command_lines(draw: st.DrawFn, command: str) -> list[str]:
    actions = _options(command)
    argv = [command, "--task", draw(TASKS)] if "--task" in _parser_options(command) else [command]
    for action in actions:
        if not action.option_strings:  # a positional: always given
            argv.append(draw(_value(action)))
    optional = [a for a in actions if a.option_strings]
    for action in draw(st.lists(st.sampled_from(optional), unique=True, max_size=6)) if optional else []:
        name = action.option_strings[0]
        argv += [name] if action.nargs == 0 else [name, draw(_value(action))]
    return argv + ["--device", "cpu", "--json"]


@functools.cache
def _parser_options(command: str) -> set[str]:
    from tda_core.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {o for a in sub._actions for o in a.option_strings}


def _commands() -> list[str]:
    from tda_core.cli import build_parser

    return sorted(build_parser()._subparsers._group_actions[0].choices)


def assert_clean(code: int | str, err: str, argv: list[str]) -> None:
    """A result, work begun, or exit 2 with exactly one line: never a traceback."""
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    else:
        assert code in (0, "work"), (argv, code, err)


@pytest.mark.parametrize("command", _commands())
@settings(max_examples=EXAMPLES["cli"], **SETTINGS)
@given(data=st.data())
def test_cli_arguments_never_traceback(command, guarded, data):
    argv = data.draw(command_lines(command), label="argv")
    code, err = cli(argv)
    event(f"outcome: {code}")  # counted by --hypothesis-show-statistics
    assert_clean(code, err, argv)


BAD_INPUTS = [  # every bad input a user can type, named; each must give one line and exit 2
    ["train", "--task", "nope"], ["train", "--task", "digits-mlp", "--seeds", "a-b"],
    ["train", "--task", "digits-mlp", "--seeds", "0-100000000"], ["train", "--task", "digits-mlp", "--seeds", "5-1"],
    ["train", "--task", "digits-mlp", "--seeds", "-3", "--subset-frac", "0.5"],
    ["train", "--task", "digits-mlp", "--subset-frac", "nan"], ["train", "--task", "digits-mlp", "--device", "tpu"],
    ["attribute", "--task", "digits-mlp", "--I", "0"], ["attribute", "--task", "digits-mlp", "--I", "1001"],
    ["attribute", "--task", "digits-mlp", "--D", "1001"], ["attribute", "--task", "digits-mlp", "--L", "1001"],
    ["attribute", "--task", "digits-mlp", "--damping", "nan"], ["attribute", "--task", "digits-mlp", "--damping", "inf"],
    ["attribute", "--task", "digits-mlp", "--damping", "-1"], ["attribute", "--task", "digits-mlp", "--proj-dim", "0"],
    ["attribute", "--task", "digits-mlp", "--proj-dim", str(10**30)],
    ["attribute", "--task", "digits-mlp", "--dropout-p", "1"], ["attribute", "--task", "digits-mlp", "--n-test", "-1"],
    ["attribute", "--task", "digits-mlp", "--n-test", "0"], ["attribute", "--task", "digits-mlp", "--n-test", "100000"],
    ["attribute", "--task", "digits-mlp", "--n-test", str(10**30)],
    ["attribute", "--task", "digits-mlp", "--save-scores", "out.txt"],
    ["attribute", "--task", "digits-mlp", "--hessian", "exact"],
    ["ground-truth", "--task", "digits-mlp", "--M", "10001"], ["ground-truth", "--task", "digits-mlp", "--M", "0"],
    ["ground-truth", "--task", "digits-mlp", "--alpha", "1.5"], ["ground-truth", "--task", "digits-mlp", "--runs", "0"],
    ["ground-truth", "--task", "digits-mlp", "--eval-seed", "-1"], ["ground-truth", "--task", "digits-mlp", "--chunk",
                                                                    "0"],
    ["sweep", "--task", "digits-mlp", "--methods", "nope"], ["sweep", "--task", "digits-mlp", "--x", "lds"],
    ["sweep", "--task", "digits-mlp", "--proj", ""], ["results", "--csv", "none.csv"], ["results", "--csv", "junk.csv"],
    ["results", "--csv", "empty.csv"], ["results", "--csv", "nocolumns.csv", "--methods", "trak"],
    ["results", "--csv", "adir.npz"], ["counterfactual", "--task", "digits-mlp", "--k", "0"],
    ["counterfactual", "--task", "digits-mlp", "--test", "-1"], ["counterfactual", "--task", "digits-mlp", "--seeds",
                                                                 "x"],
    ["snippet", "--task", "digits-mlp", "--out", "x.mid"], ["snippet", "--task", "maestro-mt", "--out", "x.mid"],
    ["datasets", "--download", "nope"], ["train"], ["nope"], ["attribute", "--task", "digits-mlp", "--I", "two"],
    ["compare", "--task", "digits-mlp", "kind=naive,bogus=1", "kind=naive"],
    ["compare", "--task", "digits-mlp", "kind=dropout,D=99999", "kind=naive"],
    ["add-image-folder", "missing/dir"], ["add-image-folder", "adir.npz"],
    ["lds", "--task", "digits-mlp", "--scores", "junk.npz"], ["lds", "--task", "digits-mlp", "--scores", "none.npz"],
    ["tasks", "--tasks-file", "tasks.py"], ["tasks", "--tasks-file", "none.py"],
    ["export-ground-truth", "--task", "digits-mlp", "--M", "0", "--out", "x.npz"],
    ["sweep", "--task", "digits-mlp", "--methods", "trak\r\nerror: injected"],
]


@pytest.mark.parametrize("argv", BAD_INPUTS, ids=[" ".join(a)[:60] for a in BAD_INPUTS])
def test_each_bad_input_gives_one_line_and_exit_2(argv, guarded):
    code, err = cli([*argv, "--json"] if len(argv) > 1 else argv)
    assert code == 2, (argv, code, err)
    assert_clean(code, err, argv)


# --- the specs -----------------------------------------------------------------------------------------
def _ints() -> st.SearchStrategy:  # mostly plausible, so that a spec has one or two bad fields at a time
    plausible = st.integers(1, 20)
    return st.one_of(plausible, plausible, plausible, plausible, st.integers(-5, 5), st.integers(-10**12, 10**12),
                     st.sampled_from([1000, 1001, 10000, 10001]))


def _reals() -> st.SearchStrategy:
    plausible = st.floats(0.01, 0.99)
    return st.one_of(plausible, plausible, plausible, st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([0.0, 1.0, 0.5, 1e-9, -0.0]))


def _names(valid: tuple[str, ...]) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid), SAFE_TEXT)


@settings(max_examples=EXAMPLES["specs"], **SETTINGS)
@given(data=st.data())
def test_specs_either_validate_or_say_what_is_wrong(data):
    """Any value of each field's type: a UserError, or a spec whose values are usable."""
    from tda_core import specs
    from tda_core.ensembles import ENSEMBLES
    from tda_core.methods import METHODS, hessians
    from tda_core.projections import PROJECTIONS

    kind = data.draw(st.sampled_from(["ensemble", "method", "eval", "recipe"]))
    try:
        if kind == "ensemble":
            spec = specs.EnsembleSpec(kind=data.draw(_names(ENSEMBLES.names())), I=data.draw(_ints()),
                                      D=data.draw(_ints()), L=data.draw(_ints()), P=data.draw(_ints()),
                                      dropout_p=data.draw(st.none() | _reals()), masks=data.draw(_names(
                                          specs.MASK_MODES)), lora_rank=data.draw(_ints()),
                                      lora_epochs=data.draw(_ints()), lora_grad=data.draw(_names(
                                          specs.LORA_GRADIENTS)), forward_grad=data.draw(_names(
                                          specs.FORWARD_GRADIENTS)))
            ceiling = {"I": 1000, "D": 1000, "L": 1000, "P": 1000, "lora_rank": 1000}
            assert all(1 <= getattr(spec, f) <= c for f, c in ceiling.items()) and spec.lora_epochs >= 0
            assert spec.dropout_p is None or 0 <= spec.dropout_p < 1
        elif kind == "method":
            spec = specs.MethodSpec(name=data.draw(_names(METHODS.names())), proj=data.draw(_names(PROJECTIONS.names())),
                                    proj_dim=data.draw(_ints()), damping=data.draw(st.none() | _reals()),
                                    hessian=data.draw(_names(hessians())),
                                    proj_dtype=data.draw(_names(specs.PROJ_DTYPES)))
            assert spec.proj_dim >= 1 and (spec.damping is None or 0 <= spec.damping < math.inf)
        elif kind == "eval":
            spec = specs.EvalSpec(M=data.draw(_ints()), alpha=data.draw(_reals()), runs=data.draw(_ints()),
                                  seed=data.draw(_ints()))
            assert 1 <= spec.M <= 10000 and 1 <= spec.runs <= 100 and 0 < spec.alpha < 1 and spec.seed >= 0
        else:
            spec = specs.Recipe(epochs=data.draw(_ints()), batch_size=data.draw(_ints()), lr=data.draw(_reals()),
                                optimizer=data.draw(_names(specs.OPTIMIZERS)))
            assert spec.epochs >= 1 and spec.batch_size >= 1 and spec.lr > 0
        event(f"{kind}: valid")
    except UserError as exc:
        assert "\n" not in str(exc)
        event(f"{kind}: refused")


@pytest.mark.parametrize("field", ["I", "D", "L", "M"])
def test_counts_above_their_ceiling_are_refused_with_the_reason(field):
    from tda_core.specs import EnsembleSpec, EvalSpec

    with pytest.raises(UserError, match=f"{field}=10001 is above the ceiling of .*(training run|gradient pass)"):
        (EvalSpec if field == "M" else EnsembleSpec)(**{field: 10001})


# --- the store's names ----------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES["store_names"], **SETTINGS)
@given(kind=st.one_of(SAFE_TEXT, st.from_regex(r"[A-Za-z0-9_.=/-]{1,12}", fullmatch=True),
                     st.sampled_from(["..", ".", "a/b", "/etc", "checkpoints"])),
       key=st.one_of(SAFE_TEXT, st.from_regex(r"[A-Za-z0-9_.=/-]{1,30}", fullmatch=True),
                     st.sampled_from(["..", "../../x", "k", "a" * 200])))
def test_store_names_never_address_a_file_outside_the_root(kind, key, tmp_path_factory):
    from tda_core.store import Store

    store = Store(tmp_path_factory.getbasetemp() / "names")
    try:
        path = store._base(kind, key)
    except UserError:
        event("refused")
        return
    event("accepted")
    assert path.resolve().parent.parent == store.root.resolve() and path.name == key


# --- MIDI ------------------------------------------------------------------------------------------------
def _valid_midi() -> bytes:
    from tda_core.data import midi_codec as mc

    notes = [mc.Note(48 + (i * 5) % 40, i * 0.2, i * 0.2 + 0.15 + (i % 3) * 0.2, 30 + (i * 7) % 90) for i in range(60)]
    return mc.midi_bytes(mc.notes_to_midi(notes))


VALID_MIDI = _valid_midi()
HEADER = 22  # MThd chunk (14 bytes) + MTrk tag and length (8): mutations after it keep the file's structure


def check_midi(data: bytes) -> None:
    """Loaded (tokens in the vocabulary, ending with END) or MidiError; bounded time and memory."""
    from tda_core.data import midi_codec as mc

    tracemalloc.start()
    try:
        tokens = mc.load_midi_tokens(data)
        event("loaded")
        assert tokens.dtype == np.int64 and tokens[-1] == mc.END and ((tokens >= 0) & (tokens < mc.VOCAB_SIZE)).all()
    except mc.MidiError as exc:
        event(f"refused: {str(exc).split('(')[-1].split(':')[0][:30]}")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 400 * 2**20, f"{peak / 2**20:.0f} MiB"  # pretty_midi's 10^7-tick arrays stay under ~230 MiB


@settings(max_examples=EXAMPLES["midi_random"], **SETTINGS)
@given(st.one_of(st.binary(max_size=2048), st.binary(max_size=64).map(lambda b: b"MThd" + b)))
def test_midi_from_random_bytes_is_loaded_or_refused(data):
    check_midi(data)


@st.composite
def mutated_midi(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID_MIDI)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(HEADER, len(data) - 1))
        how = draw(st.sampled_from(["byte", "big-delta", "tempo", "truncate", "cut"]))
        if how == "byte":
            data[at] = draw(st.integers(0, 255))
        elif how == "big-delta":  # a delta time near the 4-byte maximum
            data[at:at] = bytes([0x8F, 0xFF, 0xFF, 0x7F])
        elif how == "tempo":  # the slowest tempo there is
            data[at:at] = bytes([0x00, 0xFF, 0x51, 0x03, 0xFF, 0xFF, 0xFF])
        elif how == "truncate":
            del data[at:]
            break
        else:
            del data[at:at + draw(st.integers(1, 16))]
    if draw(st.booleans()):  # the track's length field follows the edits, so the parser reads them as events
        data[18:22] = max(0, len(data) - HEADER).to_bytes(4, "big")
    if draw(st.booleans()):  # one tick per quarter note: every tick lasts as long as possible
        data[12:14] = b"\x00\x01"
    return bytes(data)


@st.composite
def extreme_midi(draw: st.DrawFn) -> bytes:
    """A well-formed file with extreme contents: huge delta times, the slowest or fastest tempos, one tick per
    beat, notes never released or released twice, stray controller values."""
    import mido

    mid = mido.MidiFile(file=io.BytesIO(VALID_MIDI))
    mid.ticks_per_beat = draw(st.sampled_from([mid.ticks_per_beat, 1, 2, 32767]))
    for track in mid.tracks:
        for _ in range(draw(st.integers(0, 4))):
            at = draw(st.integers(0, max(0, len(track) - 1)))
            choice = draw(st.sampled_from(["delta", "tempo", "unreleased", "pedal", "drop"]))
            if choice == "delta" and len(track):
                track[at] = track[at].copy(time=draw(st.sampled_from([0x0FFFFFFF, 9_999_000, 10**6, 0])))
            elif choice == "tempo":
                track.insert(at, mido.MetaMessage("set_tempo", tempo=draw(st.sampled_from([1, 0xFFFFFF, 500000]))))
            elif choice == "unreleased":
                track.insert(at, mido.Message("note_on", note=draw(st.integers(0, 127)), velocity=127))
            elif choice == "pedal":
                track.insert(at, mido.Message("control_change", control=64, value=draw(st.integers(0, 127))))
            elif len(track) > 1:
                del track[at]
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


@settings(max_examples=EXAMPLES["midi_mutated"], **SETTINGS)
@given(st.one_of(mutated_midi(), extreme_midi()))
def test_mutated_midi_is_loaded_or_refused_within_bounded_memory(data):
    check_midi(data)


def test_slowest_tempo_at_the_largest_tick_is_refused_not_expanded():
    """Before the length ceiling this file meant 1.7e8 s of silence: a loop of a million time shifts."""
    import mido

    mid = mido.MidiFile(ticks_per_beat=1)
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=0xFFFFFF, time=0),
                            mido.Message("note_on", note=60, velocity=64, time=0),
                            mido.Message("note_off", note=60, velocity=0, time=9_999_990)])
    mid.tracks.append(track)
    buf = io.BytesIO()
    mid.save(file=buf)
    from tda_core.data import midi_codec as mc

    with pytest.raises(mc.MidiError, match="ceiling 14400 s"):
        mc.load_midi_tokens(buf.getvalue())


def _maestro(root: Path, csv_text: str, files: dict[str, bytes]) -> Path:
    folder = root / "maestro-v3.0.0"
    folder.mkdir(parents=True)
    (folder / "maestro-v3.0.0.csv").write_text(csv_text)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_maestro_file_names_cannot_leave_the_maestro_folder(tmp_path, caplog):
    from tda_core.data import load_dataset

    (tmp_path / "secret.midi").write_bytes(VALID_MIDI)  # a readable MIDI file outside the folder
    _maestro(tmp_path / "data", "split,midi_filename\ntrain,../../secret.midi\ntrain,/etc/passwd\n"
                                "train,a.midi\ntest,b.midi\n", {"a.midi": VALID_MIDI, "b.midi": VALID_MIDI})
    with caplog.at_level("WARNING"):
        ds = load_dataset("maestro", tmp_path / "data")
    assert ds.n_train > 0
    warning = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warning) == 1 and "skipped 2 of 4" in warning[0] and "leads outside" in warning[0]


@settings(max_examples=EXAMPLES["maestro_csv"], **SETTINGS)
@given(csv_text=st.one_of(st.text(max_size=200), st.sampled_from(["", "split\n", "split,midi_filename\n",
                                                        "split,midi_filename\ntrain,a.midi\ntest,a.midi\n",
                                                        "split,midi_filename\ntrain,a.midi\ntest,missing.midi\n"])))
def test_maestro_csv_of_any_content_loads_or_gives_a_user_error(csv_text, tmp_path_factory):
    from tda_core.data import load_dataset

    root = tmp_path_factory.mktemp("maestro")
    _maestro(root, csv_text, {"a.midi": VALID_MIDI})
    try:
        load_dataset("maestro", root)
        event("loaded")
    except UserError as exc:
        assert "\n" not in str(exc)
        event("refused")


# --- CIFAR and MNIST files -----------------------------------------------------------------------------
def _cifar_batch(n: int = 12, shape: tuple[int, ...] | None = None, labels: list[int] | None = None) -> bytes:
    data = np.arange(n * 3072, dtype=np.uint8).reshape(shape or (n, 3072))
    return pickle.dumps({"data": data, "labels": labels if labels is not None else [3, 5, 0, 1] * (n // 4)},
                        protocol=2)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


CIFAR_DAMAGE = st.one_of(
    st.binary(max_size=512).map(lambda b: ("random bytes", b)),
    st.integers(1, len(_cifar_batch()) - 1).map(lambda k: ("truncated", _cifar_batch()[:k])),
    st.just(("wrong shape", _cifar_batch(shape=(12 * 3072 // 96, 96)))),
    st.just(("labels out of range", _cifar_batch(labels=[3, 5, 11, -1] * 3))),
    st.just(("labels too few", _cifar_batch(labels=[3, 5]))),
    st.just(("not a dict", pickle.dumps([1, 2, 3], protocol=2))),
    st.just(("code in the pickle", pickle.dumps({"data": _Evil()}, protocol=2))),
)


@settings(max_examples=EXAMPLES["cifar"], **SETTINGS)
@given(damage=CIFAR_DAMAGE, which=st.integers(0, 5))
def test_damaged_cifar_batch_gives_a_user_error_naming_the_file(damage, which, tmp_path_factory):
    from tda_core.data import load_dataset
    from tda_core.data.images import CIFAR_FOLDER, CIFAR_TEST_FILE, CIFAR_TRAIN_FILES

    root = tmp_path_factory.mktemp("cifar")
    folder = root / CIFAR_FOLDER
    folder.mkdir()
    names = [*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE]
    for i, name in enumerate(names):
        (folder / name).write_bytes(damage[1] if i == which else _cifar_batch())
    event(damage[0])
    with pytest.raises(UserError, match=names[which]):
        load_dataset("cifar2", root)
    assert not (Path.cwd() / "pwned.txt").exists()


def _idx(kind: str, n: int = 8) -> bytes:
    if kind == "images":
        return bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28)) + bytes(n * 28 * 28)
    return bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(i % 10 for i in range(n))


IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
IDX_DAMAGE = st.one_of(st.binary(max_size=256).map(lambda b: ("random bytes", lambda good: b)),
                       st.integers(1, 200).map(lambda k: ("truncated", lambda good: good[:min(k, len(good) - 1)])),
                       st.just(("labels out of range", lambda good: good[:8] + bytes([200]) * (len(good) - 8))),
                       st.just(("other shape", lambda good: _idx("labels", 3) if b"\x08\x03" in good[:4]
                                else _idx("images", 3))))


@settings(max_examples=EXAMPLES["idx"], **SETTINGS)
@given(damage=IDX_DAMAGE, which=st.integers(0, 3))
def test_damaged_mnist_idx_file_gives_a_user_error_naming_it(damage, which, tmp_path_factory):
    from tda_core.data import load_dataset

    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for i, name in enumerate(IDX_FILES):
        good = _idx("images" if "images" in name else "labels")
        (raw / name).write_bytes(damage[1](good) if i == which else good)
    event(damage[0])
    with pytest.raises(UserError, match=r"MNIST/raw/(train|t10k)-(images|labels)"):
        load_dataset("mnist", root)


def _png(size: tuple[int, int] = (8, 8), shade: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size, shade).save(buf, format="PNG")
    return buf.getvalue()


def _huge_header() -> bytes:
    """A PNG whose header claims 100000 x 100000 pixels: refused from the header, never decoded."""
    import struct
    import zlib

    data = bytearray(_png())
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


IMAGE_DAMAGE = st.one_of(st.binary(max_size=300).map(lambda b: ("random bytes", b)),
                         st.integers(1, len(_png()) - 1).map(lambda k: ("truncated", _png()[:k])),
                         st.just(("header of 10^10 pixels", _huge_header())),
                         st.tuples(st.integers(8, len(_png()) - 1), st.integers(0, 255)).map(
                             lambda t: ("byte changed", _png()[:t[0]] + bytes([t[1]]) + _png()[t[0] + 1:])))


@settings(max_examples=EXAMPLES["image_folder"], **SETTINGS)
@given(damage=IMAGE_DAMAGE, name=st.sampled_from(["x.png", "x.jpg", "x.gif"]))
def test_image_folder_with_a_damaged_file_loads_the_rest_or_says_why(damage, name, tmp_path_factory, caplog):
    from tda_core.data.image_folder import MAX_PIXELS, load_image_folder

    root = tmp_path_factory.mktemp("images")
    for label in ("cat", "dog"):
        (root / label).mkdir()
        for i in range(3):
            (root / label / f"{i}.png").write_bytes(_png(shade=40 * i + (100 if label == "dog" else 0)))
    (root / "cat" / name).write_bytes(damage[1])
    event(damage[0])
    caplog.clear()  # one fixture serves every example
    tracemalloc.start()
    try:
        with caplog.at_level("WARNING"):
            ds = load_image_folder("pets", root, size=8, channels=1)
        skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert ds.n_train + ds.n_test in (6, 7) and len(skipped) == (ds.n_train + ds.n_test == 6)
    except UserError as exc:
        assert "\n" not in str(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # bounded by the loader's pixel ceiling: one RGBA decode of the largest image it admits plus a converted copy
    # (measured peaks: 67 MB and 84 MB for 16.8-megapixel headers)
    assert peak < MAX_PIXELS * 6 + 16 * 2**20
