"""Data builders, each building its data on first use, and the metrics reported on them:

- `scenes`: generated compositional scenes with held-out colour/shape pairs (captioning);
- `real`: real images with human-written captions that install offline (Tux Paint stamps, Noto emoji);
- `speech`: spoken questions synthesised with espeak-ng (seen and held-out voices);
- `driving`: highway-env demonstrations of a rule-based driver, recorded deterministically from seeds;
- `metrics`: BLEU-4 / CIDEr, scene attribute accuracy, WER and exact-match answer accuracy."""
