"""How a score becomes a verdict: provenance evidence read from the file (`provenance`),
calibrated probabilities and the uncertain band (`calibration`), the consistency check
(`consistency`), inputs outside the training data (`familiarity`), the one rule that
combines them (`verdict`: `decide_for(card, ...)`), and naming the generator or `unknown`
(`attribution`).
Knows nothing of models beyond a card's threshold and band."""
