"""Fine-tuning, retrieval metrics, evaluation of an index, and the data sets of the demo."""
