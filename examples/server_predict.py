"""README's server flow, the Python side: zero-shot on the exported demo data, plain CLIP vs RECO."""

import numpy as np

from reco_qdrant import FusionModel, Memory, RecoClassifier

ev = np.load("data/eval.npz")  # image [E, d], label [E], class_names [C], class_text [C, d]
names = [str(c) for c in ev["class_names"]]
with Memory.open() as memory:  # RECO_MEMORY: the server
    reco = RecoClassifier(memory, FusionModel.from_pretrained("runs/server/best"))
    reco.set_class_embeddings(ev["class_text"], names)
    plain = RecoClassifier(use_retrieval=False).set_class_embeddings(ev["class_text"], names)
    truth = [names[i] for i in ev["label"]]
    for name, clf in (("plain CLIP", plain), ("RECO", reco)):
        print(f"{name}: top-1 {np.mean(np.array(clf.predict_embeddings(ev['image'])) == truth):.3f}")
