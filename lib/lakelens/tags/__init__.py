"""Tags: vocabularies, the tag job, calibration, captions (CoCa) and the tags table."""
