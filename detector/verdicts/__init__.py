"""How a score becomes a verdict: provenance evidence read from the file (`provenance`),
calibrated probabilities and the uncertain band (`calibration`), the consistency check
(`consistency`), inputs outside the training data (`familiarity`) and the one rule that
combines them (`verdict`: `decide_for(card, ...)`).
Knows nothing of models beyond a card's threshold and band."""
