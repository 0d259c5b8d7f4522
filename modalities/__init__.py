"""Modality adapters: raw images, speech and driving-sensor frames -> prefix embeddings for the backbone.

Each adapter is one file here (vision.py, audio.py, driving.py); data builders and metrics are in data/.
A new modality is an adapter here, a task in pipelines/tasks/ and a recipe in configs/ (docs/adding-a-modality.md)."""
