"""Hostile files given to read: each is refused in one line with exit code 2, within seconds, reading no more
than it must, writing nothing and changing no input.

A --config fuzz (values of the wrong type, nesting, devices, a FIFO, a huge file, content without its
extension), .npz files whose headers lie or hold pickles, --data folders with symlink loops or links
into the output, and output names that would leave their folder. Every case checks the SHA-256 of
every input, the exit code, the single ``error:`` line, and that no file or folder appeared.
"""
import hashlib
import json
import os
import shutil
import signal
import stat
import zipfile

import numpy as np
import pytest

import denoise
import evaluate
import lora_finetune
import lora_tools
import train
from cli import read_config_file
from inputs import CONFIG_MAX_BYTES
from test_writers import refused

TINY = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32"]
SECONDS = 20  # a case that takes longer hangs (a FIFO read) or reads without bound (/dev/urandom)


@pytest.fixture(autouse=True)
def _bounded_time():
    """A case that blocks or reads without end fails the test instead of hanging it."""
    def expire(*_):
        raise TimeoutError(f"a case took more than {SECONDS} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def case(tmp_path, monkeypatch):
    """A folder to work in (the current directory too, so default paths land where the test looks)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(lora_finetune, "fit", lambda *a, **k: pytest.fail("fine-tune started"))
    return tmp_path


def tree_hash(folder):
    """{relative path: SHA-256} of every file under ``folder``; a link as its target's text, a FIFO as "fifo", a
    file over 64 MB (the sparse 4 GB one) as its size and mtime: hashing them would block or take minutes."""
    out = {}
    for dirpath, dirnames, names in os.walk(folder):
        for n in names + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if os.path.islink(p):
                out[p] = "-> " + os.readlink(p)
            elif not stat.S_ISREG(st.st_mode):
                out[p] = stat.filemode(st.st_mode)
            elif st.st_size > 64 << 20:
                out[p] = (st.st_size, st.st_mtime_ns)
            else:
                with open(p, "rb") as f:
                    out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_refused(main, argv, capsys, folder, expected):
    """Exit 2, one line holding ``expected``, every file under ``folder`` unchanged and nothing new there."""
    before = tree_hash(folder)
    names = sorted(os.listdir(folder))
    line = refused(main, argv, capsys)
    assert expected in line, line
    assert "allow_pickle" not in line and "Traceback" not in line, line
    assert tree_hash(folder) == before and sorted(os.listdir(folder)) == names
    return line


# ------------------------------------------------------------------ --config

TOML_TYPES = [  # (section body, what the line must name): a value of the wrong type is never taken as another
    ('[model]\npos_emb = "no"\n', "pos_emb must be true or false, got 'no'"),
    ('[model]\npos_emb = 0\n', "pos_emb must be true or false"),
    ('[train]\ncompile = "yes"\n', "compile must be true or false"),
    ("[train]\nout_dir = 5\n", "out_dir must be a path (a string), got 5"),
    ("[train]\ndata_dir = true\n", "data_dir must be a path"),
    ("[model]\narch = 5\n", "arch must be one of sd, tutorial (a string), got 5"),
    ("[train]\ndataset = 1\n", "dataset must be one of"),
    ('[train]\nlr = "0.1"\n', "lr must be a number, got '0.1'"),
    ("[train]\nmax_steps = 1.5\n", "max_steps must be an integer"),
    ("[train]\nmax_steps = true\n", "max_steps must be an integer"),
    ('[model]\nchannels = "64,128"\n', "channels must be a list of integers"),
    ('[model]\nchannels = [64, "128"]\n', "channels must be a list of integers"),
    ("[model]\nchannels = [64.7, 128]\n", "channels must be a list of integers"),
    ('[runtime]\nseed = "0"\n', "seed must be an integer"),
    ("[model]\nchannels = [[64], [128]]\n", "model.channels is nested"),
    ("[model]\nimg_size = {side = 28}\n", "model.img_size is nested"),
    ("model = 5\n", "settings go in sections"),
]
JSON_TYPES = [
    ({"model": {"pos_emb": "no"}}, "pos_emb must be true or false"),
    ({"train": {"compile": 1}}, "compile must be true or false, got 1"),
    ({"train": {"out_dir": None}}, "out_dir must be a path (a string), got None"),
    ({"train": {"out_dir": 5}}, "out_dir must be a path (a string), got 5"),
    ({"model": {"arch": 5}}, "arch must be one of sd, tutorial"),
    ({"diffusion": {"timesteps": "1000"}}, "timesteps must be an integer"),
    ({"model": {"channels": [[64]]}}, "model.channels is nested"),
    ({"model": {"channels": {"a": 1}}}, "model.channels is nested"),
    ([1, 2], "settings go in sections"),
]


def _write(folder, name, data):
    p = folder / "inputs" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


@pytest.mark.parametrize("body,expected", TOML_TYPES, ids=[e.split(" ")[0] + str(i) for i, (_, e) in
                                                             enumerate(TOML_TYPES)])
def test_a_toml_value_of_the_wrong_type_is_named(case, capsys, body, expected):
    cfg = _write(case, "run.toml", body)
    assert_refused(train.main, [*TINY, "--config", cfg], capsys, case, expected)


@pytest.mark.parametrize("data,expected", JSON_TYPES, ids=[str(i) for i in range(len(JSON_TYPES))])
def test_a_json_value_of_the_wrong_type_is_named(case, capsys, data, expected):
    cfg = _write(case, "config.json", json.dumps(data))
    assert_refused(train.main, [*TINY, "--config", cfg], capsys, case, expected)


def test_a_string_setting_given_a_number_is_named_in_the_fine_tune(case, capsys, tiny_ckpt):
    shutil.copy(tiny_ckpt, case / "ckpt.pt")
    cfg = _write(case, "lora.toml", "[lora]\nstyle = 5\n")
    assert_refused(lora_finetune.main, [*TINY, "--ckpt", case / "ckpt.pt", "--config", cfg], capsys, case,
                   "style must be a string (a name), got 5")


def _special_files(case):
    """(name, path, what the line must say): files that are no config, each refused before a byte is read."""
    inputs = case / "inputs"
    inputs.mkdir(exist_ok=True)
    os.mkfifo(inputs / "fifo.toml")
    os.symlink("loop.json", inputs / "loop.json")
    os.symlink("nowhere.json", inputs / "dangling.json")
    with open(inputs / "huge.json", "wb") as f:  # sparse: 4 GB claimed, nothing on disk
        f.truncate(4 << 30)
    (inputs / "big.toml").write_bytes(b"#" * (CONFIG_MAX_BYTES + 1))
    (inputs / "binary.json").write_bytes(bytes(range(256)) * 4)
    (inputs / "deep.json").write_text("[" * 100_000)
    (inputs / "deep_obj.json").write_text('{"a":' * 100_000)
    (inputs / "deep.toml").write_text("x = " + "[" * 100_000)
    (inputs / "folder").mkdir()
    return [
        ("/dev/zero", "/dev/zero", "is a character device, not a file"),
        ("/dev/urandom", "/dev/urandom", "is a character device, not a file"),
        ("/dev/null", "/dev/null", "is a character device, not a file"),
        ("fifo", inputs / "fifo.toml", "is a FIFO (named pipe), not a file"),
        ("symlink loop", inputs / "loop.json", "a symlink loop"),
        ("dangling link", inputs / "dangling.json", "no such file"),
        ("huge", inputs / "huge.json", "4,294,967,296 bytes, more than the 1,048,576"),
        ("1 MB + 1", inputs / "big.toml", "more than the 1,048,576"),
        ("binary", inputs / "binary.json", "is not text"),
        ("deep list", inputs / "deep.json", "nested too deeply"),
        ("deep object", inputs / "deep_obj.json", "nested too deeply"),
        ("deep toml", inputs / "deep.toml", "--config"),
        ("folder", inputs / "folder", "is a folder, not a file"),
    ]


SPECIAL = ["/dev/zero", "/dev/urandom", "/dev/null", "fifo", "symlink loop", "dangling link", "huge", "1 MB + 1",
           "binary", "deep list", "deep object", "deep toml", "folder"]


@pytest.mark.parametrize("script", ["train", "lora_finetune"])
@pytest.mark.parametrize("which", SPECIAL)
def test_a_config_that_is_no_regular_file_or_too_large_is_refused_unread(case, capsys, tiny_ckpt, script, which):
    shutil.copy(tiny_ckpt, case / "ckpt.pt")
    name, path, expected = next(c for c in _special_files(case) if c[0] == which)
    main, extra = (train.main, []) if script == "train" else (lora_finetune.main, ["--ckpt", case / "ckpt.pt"])
    assert_refused(main, [*TINY, *extra, "--config", path], capsys, case, expected)


def test_a_config_is_known_by_its_content_not_its_name(tmp_path):
    toml = tmp_path / "settings"  # a valid TOML without .toml
    toml.write_text('[train]\nmax_steps = 7\n[model]\npos_emb = false\n')
    assert read_config_file(str(toml)) == {"train": {"max_steps": 7}, "model": {"pos_emb": False}}
    as_toml = tmp_path / "config.toml"  # JSON under a TOML name
    as_toml.write_text(json.dumps({"model": {"channels": [32, 64]}}))
    assert read_config_file(str(as_toml)) == {"model": {"channels": (32, 64)}}


def test_a_config_without_extension_is_read_and_its_bad_value_named(case, capsys):
    cfg = _write(case, "settings", '[model]\npos_emb = "no"\n')
    assert_refused(train.main, [*TINY, "--config", cfg], capsys, case, "pos_emb must be true or false")


def test_the_start_up_line_and_the_model_agree_on_a_boolean_from_a_file(case, tmp_path, monkeypatch):
    cfg = _write(case, "run.toml", "[model]\npos_emb = false\n")
    args = train.parse_args([*TINY, "--config", str(cfg)])
    tcfg, mcfg = train.resolve_configs(args)[:2]
    assert mcfg.pos_emb is False
    from cli import config_file_note
    assert "pos_emb=False" in config_file_note(args)


# ------------------------------------------------------------------ every file read is an input

def test_a_config_inside_the_output_is_never_written_over(case, capsys, tiny_ckpt):
    out = case / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"train": {"max_steps": 3}}))
    assert_refused(train.main, [*TINY, "--config", out / "config.json", "--out-dir", out, "--overwrite"], capsys,
                   case, "is --config")
    shutil.copy(tiny_ckpt, case / "ckpt.pt")
    (case / "lora").mkdir()
    (case / "lora" / "my.toml").write_text("[lora]\nr = 2\n")
    assert_refused(lora_finetune.main, [*TINY, "--ckpt", case / "ckpt.pt", "--config", case / "lora" / "my.toml",
                                        "--out", case / "lora", "--overwrite"], capsys, case, "holds --config")


def _digits(folder, count=3):
    from PIL import Image
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            page = np.full((28, 28), 255, np.uint8)
            page[6:22, 12 + i % 3:15 + i % 3] = 0
            Image.fromarray(page).save(folder / str(label) / f"{i}.png")


def _data_cases(case, adapter):
    """(name, --data, what the line must say) for folders that are no set of digits to read; --out is a copy of
    an adapter, with digits kept in its previews/ folder."""
    out = case / "lora"
    shutil.copytree(adapter, out)
    _digits(out / "previews")
    loop = case / "loop"
    _digits(loop)
    os.symlink("x.png", loop / "3" / "y.png")
    os.symlink("y.png", loop / "3" / "x.png")
    up = case / "up"
    _digits(up)
    os.symlink("..", up / "4" / "again")
    linked = case / "linked"
    _digits(linked)
    os.symlink(out / "previews" / "5" / "0.png", linked / "5" / "mine.png")
    os.mkfifo(case / "fifo.npz")
    os.symlink("/dev/zero", case / "zero.npz")
    return [("file loop", loop, "a symlink loop"), ("folder loop", up, "leads back to a folder above it"),
            ("link into --out", linked, "holds a file of --data"), ("inside --out", out / "previews", "holds --data"),
            ("fifo", case / "fifo.npz", "is a FIFO"), ("device", case / "zero.npz", "is a character device")]


DATA = ["file loop", "folder loop", "link into --out", "inside --out", "fifo", "device"]


@pytest.mark.parametrize("which", DATA)
def test_data_that_loops_or_lies_in_the_output_is_named(case, capsys, tiny_ckpt, tiny_adapter, which):
    shutil.copy(tiny_ckpt, case / "ckpt.pt")
    name, data, expected = next(c for c in _data_cases(case, tiny_adapter) if c[0] == which)
    assert_refused(lora_finetune.main, [*TINY, "--ckpt", case / "ckpt.pt", "--data", data, "--out", case / "lora",
                                        "--overwrite"], capsys, case, expected)


# ------------------------------------------------------------------ .npz headers read before any array

def _npz_claiming(path, shape, dtype="|u1"):
    """An .npz whose images.npy header claims ``shape`` (its data is a few bytes): what MemoryError came from."""
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", buf.getvalue() + b"\0" * 64)
        z.writestr("labels.npy", _npy(np.zeros(3, np.int64)))


def _npy(a):
    import io
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _npz_cases(case):
    import pickle
    _npz_claiming(case / "huge.npz", (100_000_000, 28, 28))
    _npz_claiming(case / "wide.npz", (3, 1 << 20, 1 << 20))
    (case / "pickle.npz").write_bytes(pickle.dumps({"images": [1, 2, 3]}))
    np.savez(case / "objects.npz", images=np.array([None, 1], dtype=object), labels=np.arange(2))
    np.save(case / "single.npy", np.zeros((3, 28, 28), np.uint8))
    os.rename(case / "single.npy", case / "single.npz")
    (case / "text.npz").write_text("not an npz\n")
    return [("1e8 images", case / "huge.npz", "claim more than"), ("huge sides", case / "wide.npz", None),
            ("pickle", case / "pickle.npz", "is not a readable .npz"),
            ("object array", case / "objects.npz", "holds Python objects"),
            ("an .npy", case / "single.npz", "is not a readable .npz"),
            ("text", case / "text.npz", "is not a readable .npz")]


NPZ = ["1e8 images", "huge sides", "pickle", "object array", "an .npy", "text"]


@pytest.mark.parametrize("which", NPZ)
def test_an_npz_is_judged_by_its_headers_before_any_array_is_loaded(case, capsys, tiny_ckpt, which):
    shutil.copy(tiny_ckpt, case / "ckpt.pt")
    name, path, expected = next(c for c in _npz_cases(case) if c[0] == which)
    for main, argv in ((lora_finetune.main, [*TINY, "--ckpt", case / "ckpt.pt", "--data", path, "--out",
                                             case / "lora"]),
                       (evaluate.main, ["--samples", path, "--out-dir", case / "ev"])):
        line = assert_refused(main, argv, capsys, case, expected or str(path))
        assert "MemoryError" not in line


# ------------------------------------------------------------------ outputs stay in their folder

@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "/tmp/x", "sub/"])
def test_a_name_that_would_leave_its_folder_is_refused(case, capsys, tiny_ckpt, name):
    shutil.copy(tiny_ckpt, case / "ckpt.pt")
    (case / "out").mkdir()
    for main, argv in ((denoise.main, ["--ckpt", case / "ckpt.pt", "--out-dir", case / "out", "--name", name]),
                       (evaluate.main, ["--ckpt", case / "ckpt.pt", "--out-dir", case / "out", "--name", name])):
        assert_refused(main, argv, capsys, case, "a plain file name without folders")


def test_render_style_into_a_path_through_a_file_is_named(case, capsys):
    (case / "notes.txt").write_text("mine\n")
    assert_refused(lora_tools.main, ["render-style", "font:DejaVu Sans", "--out", case / "notes.txt" / "sub"],
                   capsys, case, "is a file, so this folder cannot be made")


def test_an_unknown_font_is_named_before_the_data_set_is_touched(case, capsys, tiny_ckpt):
    shutil.copy(tiny_ckpt, case / "ckpt.pt")
    assert_refused(evaluate.main, ["--ckpt", case / "ckpt.pt", "--style", "font:Unknown", "--n-per-label", "1"],
                   capsys, case, "font 'Unknown' is not among the fonts")
    assert not (case / "data").exists() and not (case / "out").exists()
