"""Image-caption data for the vision adapter: generated compositional scenes (`scenes`) and real
images with human-written captions that install offline (`real`: Tux Paint stamps, Noto emoji),
plus the caption metrics used to report on them (`metrics`)."""
