"""Frames cut around a particle (:mod:`ceriakeras.evaluation.framing`)."""

from __future__ import annotations

import numpy as np

from ceriakeras.evaluation.framing import framings


def test_vacuum_study_frames_leave_the_asked_room_around_the_particle():
    """evaluation.framing.framings (scripts/studies/vacuum_study.py) cuts frames with the given
    margin (Å) beyond the outermost true column, clipped by the image, and moves the truth into
    the frame's pixels."""
    image = np.arange(100 * 120, dtype=np.float64).reshape(100, 120)
    columns = np.array([[40.0, 30.0, 3.0], [50.0, 40.0, 4.0], [60.0, 50.0, 5.0]])  # x_px, y_px, h
    out = list(framings(image, columns, 0.2, (1.0, 100.0, -1.0)))
    margin, frame, inside = out[0]                                 # 1 Å = 5 px of room
    assert margin == 1.0
    np.testing.assert_array_equal(frame, image[25:56, 35:66])
    np.testing.assert_array_equal(inside, columns - [35.0, 25.0, 0.0])
    margin, frame, inside = out[1]                                 # more room than the image has
    np.testing.assert_array_equal(frame, image)
    np.testing.assert_array_equal(inside, columns)
    margin, frame, inside = out[2]                                 # cut 1 Å into the particle
    np.testing.assert_array_equal(frame, image[35:46, 45:56])
    np.testing.assert_array_equal(inside, [[5.0, 5.0, 4.0]])      # the outer two cut off
