"""The README is a short guide whose figures come from experiments/: its links resolve, it stays short, and its
results table is exactly what experiments/table.py prints from the files, so the two cannot drift."""
import importlib.util
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
EXPERIMENTS = os.path.join(ROOT, "experiments")
MAX_LINES = 300
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _table_module():
    spec = importlib.util.spec_from_file_location("experiments_table", os.path.join(EXPERIMENTS, "table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _local_links(text):
    """Targets of Markdown links and images that point into the repository (not web addresses or anchors)."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def _studies():
    return sorted(d for d in os.listdir(EXPERIMENTS)
                  if os.path.isdir(os.path.join(EXPERIMENTS, d)) and not d.startswith((".", "_")))


def test_every_file_the_readme_links_exists():
    links = _local_links(_read(README))
    assert links, "the README links no file at all"
    missing = [t for t in links if not os.path.exists(os.path.join(ROOT, t))]
    assert not missing, f"README.md links files that do not exist: {missing}"


def test_every_file_the_experiment_notes_link_exists():
    for page in [os.path.join(EXPERIMENTS, "README.md")] + [os.path.join(EXPERIMENTS, s, "notes.md") for s in _studies()]:
        here = os.path.dirname(page)
        missing = [t for t in _local_links(_read(page)) if not os.path.exists(os.path.join(here, t))]
        assert not missing, f"{os.path.relpath(page, ROOT)} links files that do not exist: {missing}"


def test_readme_is_short():
    n = len(_read(README).splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; at most {MAX_LINES}: move measurements into experiments/"


def test_results_table_is_generated_from_the_files():
    text = _read(README)
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md needs one {BEGIN} ... {END} block"
    in_readme = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    generated = _table_module().table().strip()
    assert in_readme == generated, ("the README's results table differs from what experiments/table.py prints; "
                                    "paste in the output of `python experiments/table.py`")


def test_every_study_has_notes_and_is_indexed():
    studies = _studies()
    assert "default" in studies
    index = _read(os.path.join(EXPERIMENTS, "README.md"))
    for s in studies:
        assert os.path.isfile(os.path.join(EXPERIMENTS, s, "notes.md")), f"experiments/{s}/ has no notes.md"
        assert f"({s}/notes.md)" in index, f"experiments/README.md does not list {s}/"


def test_transcribed_figures_name_the_commit_they_came_from():
    sources = []

    def walk(node):
        if isinstance(node, dict):
            if "source" in node:
                sources.append(node["source"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for s in _studies():
        path = os.path.join(EXPERIMENTS, s, "results.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                walk(json.load(f))
    assert len(sources) > 50
    # a transcribed figure names the commit; one measured since names the file its run wrote
    bad = [src for src in sources if not re.fullmatch(r"README at [0-9a-f]{40}", src)
           and not (src.startswith("experiments/") and os.path.isfile(os.path.join(EXPERIMENTS, "..", src)))]
    assert not bad, f"sources must read 'README at <full commit>' or name a file under experiments/: {bad[:3]}"


def _default_copy(tmp_path, with_run):
    """A copy of experiments/default/ with or without the files a run of the default writes."""
    dst = tmp_path / "default"
    dst.mkdir()
    with open(os.path.join(EXPERIMENTS, "default", "results.json")) as f:
        results = json.load(f)
    results["quick_start_speed"][0]["total_s"] = 599.0  # a known speed, whatever the last measurement was
    (dst / "results.json").write_text(json.dumps(results))
    if with_run:
        (dst / "eval_base").mkdir()
        (dst / "eval_lora").mkdir()
        base = {"num_samples": 1000, "sampler": "ddim", "steps": 50, "guidance": 2.0, "accuracy": 0.996,
                "frechet_distance": 24.0, "frechet_floor": 7.0, "ink": 0.16, "real_ink": 0.135, "slant": 0.1,
                "frechet_samples_vs": "mnist-5k/test (500 images)"}
        lora = {**base, "accuracy": 0.99, "slant": 0.3, "real_style": "italic", "real_style_slant": 0.4,
                "frechet_distance_style": 25.0}
        (dst / "eval_base" / "eval.json").write_text(json.dumps(base))
        (dst / "eval_lora" / "eval.json").write_text(json.dumps(lora))
        (dst / "run.json").write_text(json.dumps({"trained": "in bf16", "adapter_size": {
            "lora_parameters": 100, "base_parameters": 10000, "shared_bytes": 2048}}))
    return str(dst)


def test_table_reads_the_run_when_its_files_are_there(tmp_path, monkeypatch):
    module = _table_module()
    monkeypatch.setattr(module, "DEFAULT", _default_copy(tmp_path, with_run=True))
    out = module.table()
    assert "| base: conditional accuracy | **99.6%** |" in out
    # (0.3 - 0.1) / (0.4 - 0.1) of the way: the share is computed from the files, not copied
    assert "**67%** (slant +0.100 -> +0.300; real italic +0.400)" in out
    assert "100 parameters (1.00% of the base's 10,000), 2,048 bytes" in out
    assert "the 500 held-out digits of the offline set (mnist-5k)" in out
    assert "9 min 59 s" in out  # speed comes from default/results.json (the copy's 599 s)


def test_table_falls_back_to_the_transcribed_figures(tmp_path, monkeypatch):
    module = _table_module()
    monkeypatch.setattr(module, "DEFAULT", _default_copy(tmp_path, with_run=False))
    out = module.table()
    assert "| base: conditional accuracy | **100.0%** |" in out
    assert "**64%**" in out and "experiments/default/results.json" in out


def test_the_table_reads_the_adapter_weight_under_its_old_name_too():
    weight = _table_module()._weight
    assert weight({"lora_weight": -0.5}) == -0.5
    assert weight({"lora_scale": 0.5}) == 0.5  # an eval.json written before the strength was "weight"
    assert weight({}) == 1.0
