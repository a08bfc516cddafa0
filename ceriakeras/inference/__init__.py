"""The served model: frames to column maps and columns."""
