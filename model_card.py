"""The model card: README.md beside an adapter, as PEFT and diffusers write one, for the people it is shared with.

    write_card("out/lora", adapter, CardFacts(data="italic", steps=300, max_steps=300, lr=1e-2, command="..."))
    write_scores("out/lora", "python evaluate.py --lora out/lora", ["accuracy 99.7%, ..."])   # evaluate.py --lora

It says what the adapter is (the base and its fingerprint, the data or style, r, alpha, targets), how it was made
(steps, learning rate, the command), shows the newest preview, and holds the scores once evaluate.py scores it,
between two markers that write_scores replaces. Nothing reads the card back as data: the safetensors header is
what the scripts trust. A README.md that is not ours (PEFT's own, a user's) is never changed.
"""
from __future__ import annotations

import dataclasses
import os

from files import atomic_write
from inputs import InputError, read_regular
from logs import PREVIEW_DIR
from pictures import DATA_PREVIEW_NAME

CARD_NAME = "README.md"
CARD_MARK = "<!-- mnist-sd model card -->"  # right below the YAML block: a card this code wrote, and may update
MARK_WITHIN = 200  # characters from the top where the mark must be
SCORES_BEGIN, SCORES_END = "<!-- scores:begin -->", "<!-- scores:end -->"
CARD_MAX_BYTES = 1 << 20  # a card is a few KB; a larger README.md is someone else's
UNKNOWN = "not recorded (the adapter came without a card)"
NO_SCORES = "Not scored yet: `python evaluate.py --ckpt {base} --lora {folder}` writes its scores here."


@dataclasses.dataclass
class CardFacts:
    """How an adapter was made, which its file does not hold; None where not known (a converted adapter)."""
    data: str | None = None  # the style (italic) or the data set (a --data folder) it learnt from
    steps: int | None = None  # the steps trained so far
    max_steps: int | None = None
    lr: float | None = None
    command: str | None = None  # the command line that made it
    notes: tuple = ()  # more lines (how a converted or resized adapter came to be)


def _newest_preview(folder):
    """The newest previews/step_NNNN.png below ``folder``, as a relative link, or None."""
    try:
        names = sorted(n for n in os.listdir(os.path.join(folder, PREVIEW_DIR)) if n.endswith(".png"))
    except OSError:  # no previews (--preview-every 0, or a converted adapter)
        return None
    return f"{PREVIEW_DIR}/{names[-1]}" if names else None


def _code(value):
    return UNKNOWN if value is None else f"`{value}`"


def card_text(folder, adapter, facts, scores=None):
    """The card of ``adapter`` (adapter.Adapter, as written to ``folder``) made as ``facts`` say; ``scores`` the
    lines between the score markers (None: none yet)."""
    name = os.path.basename(os.path.normpath(folder))
    targets = adapter.targets or []
    steps = UNKNOWN if facts.steps is None else f"{facts.steps}" + (
        f" of {facts.max_steps}" if facts.max_steps not in (None, facts.steps) else "")
    rows = [("base checkpoint", _code(adapter.base_path or adapter.base_name)),
            ("base fingerprint", _code(adapter.base_fingerprint) + " (the adapter is refused on another base "
             "unless `--force`)"),
            ("data or style", _code(facts.data or adapter.style)),
            ("r (rank)", f"{adapter.r}"), ("alpha", f"{adapter.alpha:g} (the update is B A x alpha / r)"),
            ("targets", f"{len(targets)} modules, the layers " + ", ".join(
                f"`{t}`" for t in sorted({t.rsplit('.', 1)[-1] for t in targets})) + " in each block"),
            ("steps", steps), ("learning rate", UNKNOWN if facts.lr is None else f"{facts.lr:g}"),
            ("made by", _code(facts.command))]
    # Hugging Face reads the YAML block only at the very top; our mark follows it
    lines = ["---", "library_name: peft", "tags: [lora, diffusion, mnist]", "---", CARD_MARK, "",
             f"# LoRA adapter `{name}`", "",
             "A LoRA adapter (Hu et al. 2021) for a class-conditional diffusion model on MNIST digits, in the layout "
             "PEFT writes (`adapter_model.safetensors`, `adapter_config.json`). Sample with it:", "",
             f"    python denoise.py --ckpt {adapter.base_path or 'BASE'} --lora {folder}:1.0", "",
             "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += [f"{note}" for note in facts.notes] + ([""] if facts.notes else [])
    preview = _newest_preview(folder)
    if preview:
        lines += [f"![the base (top) against the adapter (below) on the same noise]({preview})", ""]
    if os.path.exists(os.path.join(folder, DATA_PREVIEW_NAME)):
        lines += [f"What it trained on: [{DATA_PREVIEW_NAME}]({DATA_PREVIEW_NAME})", ""]
    scores = scores or [NO_SCORES.format(base=adapter.base_path or "BASE", folder=folder)]
    lines += ["## Scores", "", SCORES_BEGIN, *scores, SCORES_END, "",
              "This card is for people: the scripts read only the safetensors header, which holds the base's "
              "fingerprint, the style and a hash of the tensors.", ""]
    return "\n".join(lines)


def _write(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)
    return path


def _ours(path):
    """The text of the card at ``path`` if this code wrote it; None if there is none, or it is someone else's."""
    if not os.path.lexists(path):
        return None
    try:
        text = read_regular(path, CARD_NAME, CARD_MAX_BYTES).decode("utf-8")
    except (InputError, UnicodeDecodeError):  # a folder, a FIFO, a huge or binary README.md: not our card
        return None
    return text if CARD_MARK in text[:MARK_WITHIN] and SCORES_BEGIN in text and SCORES_END in text else None


def write_card(folder, adapter, facts):
    """README.md in the adapter folder ``folder``, written atomically; a README.md there that is not ours is left
    as it is (returns None then). A new card starts without scores: the weights they scored have changed."""
    path = os.path.join(folder, CARD_NAME)
    if os.path.lexists(path) and _ours(path) is None:
        return None
    return _write(path, card_text(folder, adapter, facts))


def write_scores(folder, command, lines, adapter=None):
    """Replace the scores section of ``folder``'s card with ``command`` and ``lines``, atomically. A folder with no
    card gets one from ``adapter`` (its header's facts) first; a README.md that is not ours is left alone (None)."""
    path = os.path.join(folder, CARD_NAME)
    text = _ours(path)
    if text is None:
        if os.path.lexists(path) or adapter is None:
            return None
        text = card_text(folder, adapter, CardFacts())
    head, rest = text.split(SCORES_BEGIN, 1)
    tail = rest.split(SCORES_END, 1)[1]
    body = [f"Scored by `{command}`:", "", *[f"- {line}" for line in lines]]
    return _write(path, head + SCORES_BEGIN + "\n" + "\n".join(body) + "\n" + SCORES_END + tail)
