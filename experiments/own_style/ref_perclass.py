# per-class accuracy of the reference classifier (evaluate.py's cache) on a real style set; evaluate.py prints only the total
# run from the repository root: python experiments/own_style/ref_perclass.py DIR [DIR ...]
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from dataset import load_dataset
from metrics import classify, get_classifier
from styles import load_style_data
train = load_dataset("mnist-5k", "train", "data"); test = load_dataset("mnist-5k", "test", "data")
clf, acc = get_classifier(train, test, "data/classifier-mnist-5k.pt")
for spec in sys.argv[1:]:
    d = load_style_data(spec, log=lambda s: None)
    logits, _ = classify(clf, d.images)
    ok = (logits.argmax(1) == d.labels).float()
    print(spec, "total %.3f" % ok.mean().item(), "per class", [round(ok[d.labels == c].mean().item(), 2) for c in range(10)])
