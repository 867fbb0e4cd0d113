"""Logistic-regression probe on frozen features, tuned by cross-validation: the bar the
head's defaults must reach. Input: the JSON written by dist/scripts/dump-embeddings.js.

    apt-get install python3-sklearn          # Debian's scikit-learn, for the system python
    node dist/scripts/dump-embeddings.js datasets/fashion-mnist-mini /tmp/emb.json
    /usr/bin/python3 scripts/logreg-probe.py /tmp/emb.json

On the sample set it gave C=0.003 and 75.5% test accuracy (500 training images).
"""
import json
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

data = json.load(open(sys.argv[1]))
xtr, ytr = np.array(data["train"]["x"]), np.array(data["train"]["y"])
xte, yte = np.array(data["test"]["x"]), np.array(data["test"]["y"])
pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
grid = GridSearchCV(pipe, {"logisticregression__C": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3]}, cv=5)
grid.fit(xtr, ytr)
print(json.dumps({
    "best_C": grid.best_params_["logisticregression__C"],
    "cv_accuracy": round(grid.best_score_, 4),
    "test_accuracy": round(grid.score(xte, yte), 4),
    "train_n": len(ytr),
    "test_n": len(yte),
}))
