"""Modality adapters: raw images, speech and driving-sensor frames -> prefix embeddings for the backbone.

Coming with the vision, audio and driving issues: each adapter is one file here plus a config."""
