"""A trained model and how it runs: versioned artifacts and their cards (`artifact`), the
architectures (`architectures`), ensembles of versions (`ensemble`), ONNX and int8 exports
(`export`), the runtimes that load them (`runtimes`), the `Predictor` every stage scores
with (`predictor`) and heatmaps (`explain`)."""
