"""The model card beside every adapter: what lora_finetune.py and lora_tools.py write into it, the scores section
evaluate.py replaces, and a README.md that is not ours left alone. The card is read here as a person would."""
import os
import re
import shutil

import pytest

import lora_tools
import model_card
from adapter_formats import load_adapter, write_adapter
from model_card import CARD_NAME, SCORES_BEGIN, SCORES_END, write_card, write_scores


def row(card, name):
    """The value of the table row ``name`` of a card."""
    found = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", card, re.M)
    assert found, f"no row {name!r} in the card"
    return found.group(1)


def scores(card):
    return card.split(SCORES_BEGIN, 1)[1].split(SCORES_END, 1)[0].strip()


def test_lora_finetune_writes_a_card_with_every_field(tiny_adapter, tiny_ckpt):
    card = open(os.path.join(tiny_adapter, CARD_NAME)).read()
    ad = load_adapter(tiny_adapter)
    assert card.startswith("---\nlibrary_name: peft\n")  # the YAML block Hugging Face reads, at the very top
    assert row(card, "base checkpoint") == f"`{tiny_ckpt}`"
    assert row(card, "base fingerprint").startswith(f"`{ad.base_fingerprint}`")
    assert row(card, "data or style") == "`italic`"
    assert row(card, "r (rank)") == "2" and row(card, "alpha").startswith("2 ")
    assert row(card, "targets").startswith(f"{len(ad.targets)} modules, the layers `Wk`, `Wq`, `Wv`")
    assert row(card, "steps") == "4" and row(card, "learning rate") == "0.01"
    assert row(card, "made by") == f"`python lora_finetune.py --preset tiny --device cpu --precision fp32 --ckpt " \
                                   f"{tiny_ckpt} --out {tiny_adapter}`"
    preview = re.search(r"!\[[^\]]*\]\(([^)]+)\)", card).group(1)
    assert preview == "previews/step_0004.png" and os.path.isfile(os.path.join(tiny_adapter, preview))
    assert scores(card).startswith("Not scored yet: `python evaluate.py --ckpt")


def test_scores_are_replaced_not_added(tiny_adapter, tmp_path):
    folder = shutil.copytree(tiny_adapter, tmp_path / "lora")
    before = (folder / CARD_NAME).read_text()
    write_scores(str(folder), "python evaluate.py --lora x", ["accuracy 12.5%", "style share 3.0%"])
    write_scores(str(folder), "python evaluate.py --lora y", ["accuracy 99.0%"])
    card = (folder / CARD_NAME).read_text()
    assert scores(card) == "Scored by `python evaluate.py --lora y`:\n\n- accuracy 99.0%"
    assert card.count(SCORES_BEGIN) == 1 and card.split(SCORES_BEGIN)[0] == before.split(SCORES_BEGIN)[0]
    assert not [n for n in os.listdir(folder) if n.endswith(".sd-tmp")]  # written atomically, nothing left over
    load_adapter(str(folder))  # the card is no part of the adapter's data


def test_a_readme_that_is_not_ours_is_left_alone(tiny_adapter, tmp_path):
    folder = shutil.copytree(tiny_adapter, tmp_path / "peft")
    (folder / CARD_NAME).write_text("# My adapter\n\nWritten by PEFT.\n")
    ad = load_adapter(str(folder))
    assert write_scores(str(folder), "python evaluate.py", ["accuracy 1%"], ad) is None
    assert write_card(str(folder), ad, model_card.CardFacts()) is None
    assert (folder / CARD_NAME).read_text() == "# My adapter\n\nWritten by PEFT.\n"
    (folder / CARD_NAME).unlink()
    (folder / CARD_NAME).mkdir()  # not even a file
    assert write_scores(str(folder), "python evaluate.py", ["accuracy 1%"], ad) is None


def test_an_adapter_without_a_card_gets_one_from_its_header(tiny_adapter, tmp_path):
    folder = tmp_path / "bare"
    write_adapter(folder, load_adapter(tiny_adapter))
    assert not (folder / CARD_NAME).exists()
    write_scores(str(folder), "python evaluate.py --lora bare", ["accuracy 50.0%"], load_adapter(str(folder)))
    card = (folder / CARD_NAME).read_text()
    assert row(card, "data or style") == "`italic`" and row(card, "r (rank)") == "2"
    assert row(card, "steps") == model_card.UNKNOWN and scores(card).endswith("- accuracy 50.0%")


@pytest.mark.parametrize("command", ["resize", "convert"])
def test_lora_tools_writes_a_card_for_the_folders_it_makes(tiny_adapter, tiny_ckpt, tmp_path, command):
    if command == "resize":
        argv = ["resize", tiny_adapter, "--r", "1", "--out", str(tmp_path / "small"), "--ckpt", tiny_ckpt]
        out, note = tmp_path / "small", f"Resized from `{tiny_adapter}`, rank 2 to 1"
    else:
        kohya = tmp_path / "k.safetensors"
        lora_tools.main(["convert", tiny_adapter, "--out", str(kohya), "--ckpt", tiny_ckpt])
        assert not (tmp_path / CARD_NAME).exists()  # a single file has no folder to hold a card
        argv = ["convert", str(kohya), "--out", str(tmp_path / "back"), "--ckpt", tiny_ckpt]
        out, note = tmp_path / "back", f"Converted from `{kohya}` (kohya layout)"
    lora_tools.main(argv)
    card = (out / CARD_NAME).read_text()
    assert note in card and row(card, "made by") == f"`python lora_tools.py {' '.join(argv)}`"
    assert row(card, "r (rank)") == ("1" if command == "resize" else "2")
