"""Files in and out: atomic writes (``files``) and image series with their calibration (``series``)."""
